"""Time the Triton `linear_logprobs` kernels over a few Hopper tile configurations.

    python -m benchmarks.sweep_triton_tiles --shape llama3-4k

The defaults in kernels/linear_logprobs.py (_GPU_FWD, _GPU_BWD) are what this sweep picked;
benchmarks/results/README.md has its runs. A configuration that does not compile or does not
fit in shared memory is reported, not skipped silently. Needs CUDA.
"""

from __future__ import annotations

import argparse
import sys

import torch

from erpd import _bench
from erpd.kernels import linear_logprobs as K
from erpd.testing.shapes import by_name

from benchmarks import bench_linear_logprobs as B

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); GROUP_M applies to the backward.
FWD = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (64, 256, 64, 4, 4)]
BWD = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4)]
GROUPS = [8, 32]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sweep_triton_tiles", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama3-4k")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    shape = by_name(args.shape)
    case = B.make_case("erpd-triton", shape.name, "bf16", "cuda")
    fwd0, bwd0 = K.fwd_config, K.bwd_config
    print(f"linear_logprobs erpd-triton, {shape.id}, bf16, {_bench.device_name('cuda')}, commit {_bench.git_commit()}")

    def timed(fn) -> float:
        fn()
        _bench.sync("cuda")
        return _bench.summarize(_bench.time_ms(fn, repeats=args.repeats, device="cuda", warmup=1))["median"]

    print("\nforward tiles (BM, BN, BK, warps, stages) | fwd ms\n|---|--:|")
    for bm, bn, bk, w, st in FWD:
        K.fwd_config = lambda n, dtype, interp, c=dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st): dict(c)
        try:
            print(f"| {(bm, bn, bk, w, st)} | {timed(case.fwd):.2f} |", flush=True)
        except Exception as exc:  # noqa: BLE001  (a config that does not fit is a result)
            print(f"| {(bm, bn, bk, w, st)} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]} |", flush=True)
    K.fwd_config = fwd0
    t_fwd = timed(case.fwd)
    print(f"\nbackward tiles (BM, BN, BK, warps, stages, GROUP_M) | bwd ms (fwd+bwd − fwd, default fwd {t_fwd:.2f} ms)\n|---|--:|")
    for bm, bn, bk, w, st in BWD:
        for g in GROUPS:
            K.bwd_config = lambda dtype, interp, c=dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, num_warps=w, num_stages=st): dict(c)
            try:
                print(f"| {(bm, bn, bk, w, st, g)} | {timed(case.fwd_bwd) - t_fwd:.2f} |", flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"| {(bm, bn, bk, w, st, g)} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]} |", flush=True)
    K.bwd_config = bwd0
    return 0


if __name__ == "__main__":
    sys.exit(main())
