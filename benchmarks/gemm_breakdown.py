"""Where a CPU fwd+bwd spends its time: each GEMM shape's ms per call, and the rest.

    python -m benchmarks.gemm_breakdown --op linear_kl_loss --providers erpd-cpu,matmul-floor

Each provider runs in a fresh process, spawned as the tables' are (`erpd._bench.in_subprocess`),
on its bench module's own case (the inputs and closures of the tables): `--calls` fwd+bwd under
the torch profiler after two warm-ups. The profiler records every ATen GEMM the C++ drivers
launch, on whichever intra-op thread runs it. Per call,
a GEMM shape's time is that of its slower thread (the call waits for it); "the rest" is the wall
time minus all GEMMs: the epilogues, the allocations, the Python around them. Medians over the
calls. The profiler adds a little to every op it records, so the walls run slightly above the
tables'.
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from erpd import _bench

from benchmarks.run import OPS

GEMMS = ("aten::mm", "aten::addmm", "aten::addmm_")


def _inside_gemm(event) -> bool:
    """Whether a GEMM event runs inside another (an addmm that calls mm): counted once, as the outer."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in GEMMS:
            return True
        parent = parent.cpu_parent
    return False


def profile_provider(op: str, provider: str, shape: str, calls: int, threads: int | None) -> dict:
    """{"wall": [ms per call], "gemms": {"name [shapes]": [ms per call]}} for one provider, here."""
    from torch.profiler import ProfilerActivity, profile

    if threads:
        torch.set_num_threads(threads)
    case = importlib.import_module(OPS[op]).make_case(provider, shape, "fp32", "cpu")
    for _ in range(2):
        case.fwd_bwd()
    walls: list[float] = []
    gemms: dict[str, list[float]] = collections.defaultdict(list)
    for i in range(calls):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            t0 = time.perf_counter()
            case.fwd_bwd()
            walls.append((time.perf_counter() - t0) * 1e3)
        per_thread: dict[tuple[str, int], float] = collections.defaultdict(float)
        for e in prof.events():
            if e.name in GEMMS and not _inside_gemm(e):
                per_thread[(f"{e.name} {e.input_shapes[:2]}", e.thread)] += e.cpu_time_total / 1e3
        slowest: dict[str, float] = collections.defaultdict(float)
        for (key, _), ms in per_thread.items():
            slowest[key] = max(slowest[key], ms)
        for key, ms in slowest.items():
            gemms[key] += [0.0] * (i - len(gemms[key])) + [ms]  # a shape missing from a call took 0 there
    for v in gemms.values():
        v += [0.0] * (calls - len(v))
    return {"wall": walls, "gemms": dict(gemms)}


def render(op: str, shape: str, results: dict[str, dict], env: dict[str, str] | None = None) -> str:
    lines = [f"## {op} on {shape}: fwd+bwd ms per call, GEMMs and the rest (median over calls)", ""]
    lines += [f"- **{k}**: {v}" for k, v in (env or {}).items()]
    lines += ["", "| provider | GEMM [shapes of its operands] | ms |", "|---|---|--:|"]
    for provider, res in results.items():
        total = 0.0
        for key in sorted(res["gemms"]):
            ms = statistics.median(res["gemms"][key])
            total += ms
            lines.append(f"| {provider} | `{key}` | {ms:,.1f} |")
        wall = statistics.median(res["wall"])
        lines += [f"| {provider} | GEMMs in all | {total:,.1f} |",
                  f"| {provider} | the rest (wall − GEMMs) | {wall - total:,.1f} |",
                  f"| {provider} | wall | {wall:,.1f} |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gemm_breakdown", description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", choices=sorted(OPS), required=True)
    ap.add_argument("--providers", default="erpd-cpu,matmul-floor", help="comma-separated (default: erpd-cpu,matmul-floor)")
    ap.add_argument("--shape", default="cpu-target", help="a shape of erpd/testing/shapes.py (default cpu-target)")
    ap.add_argument("--calls", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="also write the table (with the environment) to this markdown file")
    args = ap.parse_args(argv)
    env = _bench.environment("cpu", args.threads)
    env["command"] = "python -m benchmarks.gemm_breakdown " + " ".join(sys.argv[1:] if argv is None else argv)
    results = {}
    for provider in args.providers.split(","):
        res = _bench.in_subprocess(functools.partial(profile_provider, args.op, provider, args.shape, args.calls, args.threads))
        if "error" in res:
            raise SystemExit(f"gemm_breakdown: {provider}: {res['error']}")
        results[provider] = res
    if hasattr(os, "getloadavg"):
        env["load average at the end (1/5/15 min)"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    text = render(args.op, args.shape, results, env)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
