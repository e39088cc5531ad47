"""Compile-only guard for the GPU path of `erpd.kernels.linear_logprobs`.

CI machines have no GPU, and the interpreter tests run a different code path (fp32 operands,
interpreter tile sizes). This test compiles the real GPU variants of the kernels ahead of time
for an H100 (sm_90) with `triton.compile`, with the same constexprs and tile configs the
launchers use on CUDA, and checks that PTX and a cubin come out, that each kernel fits in an
H100's shared memory, and that 16-bit operands reach the Hopper tensor cores (wgmma).

It runs in a subprocess because a test session may have set TRITON_INTERPRET=1 before the
kernel module was imported, and then its kernels exist only in interpreted form.

`SM90_PRELUDE` (the child's compile helpers) and `compile_for_sm90` are shared with the other
ops' compile tests (test_linear_kl_triton_compile.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

# Largest dynamic shared memory one block may opt into on an H100 (227 KiB).
H100_MAX_SHARED_BYTES = 232_448

SM90_PRELUDE = r"""
import json, os, sys
assert os.environ.get("TRITON_INTERPRET", "0") != "1"
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

target = GPUTarget("cuda", 90, 32)
TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Argument kinds follow the kernels' naming: the (student and teacher) h/w/b pointers carry the
# input dtype, targets are int64, every other pointer is an fp32 buffer unless `ptr_types` says
# otherwise; the scalars below are floats, all others ints.
INPUT_PTRS = ("h_ptr", "w_ptr", "b_ptr", "th_ptr", "tw_ptr", "tb_ptr")
FLOAT_SCALARS = ("inv_t", "tile_scale", "cap_scale", "beta", "log_b", "log_1mb")


def signature(fn, dtype, constexprs, ptr_types=None):
    types = {}
    for name in fn.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif ptr_types and name in ptr_types:
            types[name] = ptr_types[name]
        elif name in INPUT_PTRS:
            types[name] = "*" + TRITON_DTYPE[dtype]
        elif name == "t_ptr":
            types[name] = "*i64"
        elif name.endswith("_ptr"):
            types[name] = "*fp32"
        else:
            types[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    return types


def build(label, fn, dtype, constexprs, options, aligned_ints=("H",), ptr_types=None):
    sig = signature(fn, dtype, constexprs, ptr_types)
    # What a launch with torch-allocated tensors (16-byte aligned) and H % 16 == 0 specializes
    # on; without it the 16-bit loads are not vectorized and the K-loop is not pipelined.
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if sig[name].startswith("*") or name in aligned_ints
    }
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                       target=target, options=options)
    ptx = k.asm.get("ptx", "")
    return dict(label=label, dtype=TRITON_DTYPE[dtype], ptx_target=".target sm_90" in ptx,
                cubin_bytes=len(k.asm.get("cubin", b"")), shared=k.metadata.shared,
                wgmma="wgmma.mma_async" in ptx)


def split(cfg):
    cfg = dict(cfg)
    return cfg, dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
"""

_BODY = r"""
from erpd.kernels import linear_logprobs as K

common = dict(UPCAST=False, DOT_PRECISION=K._dot_precision(False))
out = []
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    # Forward: a large batch with bias and vocabulary splits, and a small unsplit one with a
    # ragged hidden size.
    for n, extra in ((4096, dict(HAS_BIAS=True, FINALIZE=False, SOFTCAP=False, STATS=False, EVEN_K=True)),
                     (100, dict(HAS_BIAS=False, FINALIZE=True, SOFTCAP=True, STATS=True, EVEN_K=False))):
        tiles, opts = split(K.fwd_config(n, dtype, False))
        out.append(build(f"fwd n={n} {extra}", K._linear_logprobs_fwd_kernel, dtype,
                         dict(common, **extra, **tiles), opts,
                         aligned_ints=("H",) if extra["EVEN_K"] else ()))
    tiles, opts = split(K.bwd_config(dtype, False))
    # Backward: every gradient, and the hidden-only, no-entropy, ragged-H variant.
    for extra in (dict(HAS_BIAS=True, HAS_GRAD_ENTROPY=True, SOFTCAP=False, NEED_DH=True, NEED_DW=True,
                       NEED_DB=True, EVEN_K=True),
                  dict(HAS_BIAS=False, HAS_GRAD_ENTROPY=False, SOFTCAP=True, NEED_DH=True, NEED_DW=False,
                       NEED_DB=False, EVEN_K=False)):
        out.append(build(f"bwd {extra}", K._linear_logprobs_bwd_kernel, dtype,
                         dict(common, **extra, **tiles), opts,
                         aligned_ints=("H",) if extra["EVEN_K"] else ()))
out.append(build("combine", K._linear_logprobs_combine_kernel, torch.float32,
                 dict(STATS=True, BLOCK=K.COMBINE_BLOCK), dict(num_warps=4, num_stages=1), aligned_ints=()))
print(json.dumps(out))
"""


def compile_for_sm90(tmp_path, body: str) -> list[dict]:
    """Run SM90_PRELUDE + `body` in a fresh interpreter (no TRITON_INTERPRET); `body` prints
    the JSON list of `build` results as its last line."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # A private cache: the check must really compile, and must not write to the user's cache.
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run(
        [sys.executable, "-c", SM90_PRELUDE + body], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"sm_90 compilation failed:\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_triton_kernels_compile_for_sm90(tmp_path):
    results = compile_for_sm90(tmp_path, _BODY)
    assert len(results) == 13
    for r in results:
        what = f"{r['label']} [{r['dtype']}]"
        assert r["ptx_target"], f"{what}: PTX is not for sm_90"
        assert r["cubin_bytes"] > 0, f"{what}: no cubin"
        assert r["shared"] <= H100_MAX_SHARED_BYTES, f"{what}: needs {r['shared']} B of shared memory"
        if r["dtype"] != "fp32" and r["label"] != "combine":
            assert r["wgmma"], f"{what}: 16-bit GEMMs do not use wgmma tensor-core instructions"
