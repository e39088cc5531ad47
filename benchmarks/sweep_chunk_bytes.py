"""Time the chunked `cuda`/`cpu` backends of an op against the logits budget per chunk.

    python -m benchmarks.sweep_chunk_bytes --op linear_logprobs --shape llama3-4k --dtype bf16 \
        --budgets 64M,256M,512M,1G,2G

The C++ drivers read ERPD_CHUNK_BYTES on every call, so one process can sweep it. For each
budget: rows per chunk, fwd and fwd+bwd medians, and the peak extra memory of one fwd+bwd. This
is how the defaults in csrc/common/chunked.h were chosen (benchmarks/results/README.md has the runs).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch

from erpd import _bench
from erpd.testing.shapes import by_name

from benchmarks._harness import DTYPES
from benchmarks.run import OPS

# [rows, V] fp32 buffers per chunk
ROW_WIDTH = {"linear_logprobs": 1, "linear_kl": 2, "linear_kl_loss": 2, "linear_policy_loss": 1}


def parse_bytes(tok: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    tok = tok.strip().upper()
    return int(float(tok[:-1]) * units[tok[-1]]) if tok[-1] in units else int(tok)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sweep_chunk_bytes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", choices=sorted(OPS), default="linear_logprobs")
    ap.add_argument("--shape", default="llama3-4k")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--backend", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--budgets", default="64M,256M,512M,1G,2G")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    backend = args.backend or ("cuda" if torch.cuda.is_available() else "cpu")
    device = "cuda" if backend == "cuda" else "cpu"
    shape = by_name(args.shape)
    mod = importlib.import_module(OPS[args.op])
    print(f"{args.op} erpd-{backend} on {shape.id}, {args.dtype}, {_bench.device_name(device)}, commit {_bench.git_commit()}")
    print("| budget | rows/chunk | fwd ms | fwd+bwd ms | peak extra MB |\n|--:|--:|--:|--:|--:|")
    case = mod.make_case(f"erpd-{backend}", shape.name, args.dtype, device)
    for tok in args.budgets.split(","):
        budget = parse_bytes(tok)
        os.environ["ERPD_CHUNK_BYTES"] = str(budget)
        rows = max(1, min(budget // (4 * shape.v * ROW_WIDTH[args.op]), shape.n))
        case.fwd_bwd()
        _bench.sync(device)
        extra, *_ = _bench.peak_extra_bytes(case.fwd_bwd, device)
        med = {m: _bench.summarize(_bench.time_ms(f, repeats=args.repeats, device=device, warmup=1))["median"]
               for m, f in (("fwd", case.fwd), ("fwd+bwd", case.fwd_bwd))}
        print(f"| {tok} | {rows} | {med['fwd']:.2f} | {med['fwd+bwd']:.2f} | {_bench.fmt_mb(extra)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
