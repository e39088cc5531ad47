"""`python -m erpd.compare`: the fused `erpd.linear_logprobs` next to the plain PyTorch version.

Both compute per-token log-probs and entropy from hidden states and an LM head, then
backpropagate a random upstream gradient through both. The comparison prints how far apart the
results are, the fwd+bwd time, and the peak memory each adds on top of its inputs. Each side runs
in its own fresh process, so one side's allocations cannot hide in the other's numbers.

    python -m erpd.compare [--n 2048] [--h 512] [--v 65536] [--dtype fp32] [--device cpu]

The default shape takes about half a minute on a 2-core CPU; the naive side's logits alone are
N·V·4 bytes (512 MiB here) and it keeps several such tensors alive for the backward.
"""

from __future__ import annotations

import argparse
import sys

import torch

import erpd
from erpd import _bench, backends
from erpd.testing import make_linear_inputs, naive_linear_logprobs

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# bf16/fp16 naive logits are rounded to the input dtype before the softmax; erpd keeps them fp32.
_AGREE_TOL = {"fp32": 1e-3, "bf16": 0.1, "fp16": 0.1}


def make_case(which: str, n: int, h: int, v: int, dtype: str, device: str, seed: int = 0) -> _bench.Case:
    x = make_linear_inputs(n, h, v, dtype=_DTYPES[dtype], device=device, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    upstream = {"logprobs": torch.randn(n, generator=g).to(device), "entropy": torch.randn(n, generator=g).to(device)}

    def forward():
        if which == "naive":
            lp, ent = naive_linear_logprobs(x.hidden, x.weight, x.targets)
        else:
            lp, ent = erpd.linear_logprobs(x.hidden, x.weight, x.targets, with_entropy=True, backend="auto")
        return {"logprobs": lp, "entropy": ent}

    return _bench.autograd_case(forward, (x.hidden, x.weight), upstream, device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m erpd.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2048, help="tokens (default 2048)")
    ap.add_argument("--h", type=int, default=512, help="hidden size (default 512)")
    ap.add_argument("--v", type=int, default=65536, help="vocabulary size (default 65536)")
    ap.add_argument("--dtype", default="fp32", choices=sorted(_DTYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    auto = backends.resolve("auto", dev, "linear_logprobs")
    env = _bench.environment(args.device, args.threads)

    print(f"erpd compare: linear_logprobs with entropy, fwd+bwd, N={args.n} H={args.h} V={args.v} {args.dtype} on {args.device}")
    print(f"  {env['device']}, {env['threads']} threads, torch {env['torch']}, commit {env['commit']}")
    print(f'  erpd backends here: {erpd.available(dev)}; backend="auto" -> {auto!r}')
    print(f"  a [N, V] fp32 logits tensor is {_bench.fmt_mb(4 * args.n * args.v)} MB\n", flush=True)

    results = {}
    labels = {"naive": "naive PyTorch", "auto": f'erpd backend="auto" ({auto})'}
    for which in ("naive", "auto"):
        print(f"  running {labels[which]} ...", flush=True)
        # No warm-up: a single call gives both the time and the peak memory, which keeps the
        # default shape well under a minute on two cores. Eager code has little one-time cost
        # (thread pools), so the first call is representative; benchmarks/ warms up properly.
        results[which] = _bench.measure_in_subprocess(
            "erpd.compare:make_case",
            dict(which=which, n=args.n, h=args.h, v=args.v, dtype=args.dtype, device=args.device),
            warmup=0, repeats=0, modes=(), threads=args.threads,
        )
    print()
    failed = [w for w, r in results.items() if "error" in r]
    for w in failed:
        print(f"  {labels[w]} FAILED: {results[w]['error']}")
    if failed:
        return 1

    naive, fused = results["naive"], results["auto"]
    width = max(map(len, labels.values()))
    print(f"  {'':{width}}  {'fwd+bwd ms':>11}  {'peak extra MB':>13}")
    for w in ("naive", "auto"):
        r = results[w]
        print(f"  {labels[w]:{width}}  {r['first_measured_ms']:>11,.0f}  {_bench.fmt_mb(r['peak_extra_bytes']):>13}")
    mem = fused["peak_extra_bytes"] / max(naive["peak_extra_bytes"], 1)
    t = fused["first_measured_ms"] / naive["first_measured_ms"]
    print(f"\n  erpd uses {mem:.1%} of naive's extra memory at {t:.2f}x its time")

    diffs = {
        k: float(abs(fused["outputs"][k].astype("float64") - naive["outputs"][k].astype("float64")).max())
        for k in ("logprobs", "entropy")
    }
    ok = all(d <= _AGREE_TOL[args.dtype] for d in diffs.values())
    print(
        f"  results {'agree' if ok else 'DISAGREE'}: max |diff| logprobs {diffs['logprobs']:.2e}, "
        f"entropy {diffs['entropy']:.2e} over {args.n} tokens (tolerance {_AGREE_TOL[args.dtype]:g})"
    )
    print(f"  (peak memory: {naive['memory_method']})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
