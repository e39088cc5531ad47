"""Compile-only guard for the GPU path of `erpd.kernels.policy_loss`.

The interpreter tests cannot see what only the compiler checks (loop-carried types, constexpr
branches, pointer types). This compiles the kernels ahead of time for an H100 (sm_90) with
`triton.compile`, for every method and the flag combinations the launcher produces, and checks
that PTX and a cubin come out. It runs in a subprocess for the reason given in
test_linear_logprobs_triton_compile.py (the session may have switched the interpreter on).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_CHILD = r"""
import json, os
assert os.environ.get("TRITON_INTERPRET", "0") != "1"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from erpd.kernels import policy_loss as K

target = GPUTarget("cuda", 90, 32)
FLOATS = {"lo", "hi", "dual_clip", "tau_pos", "tau_neg", "kl_coef", "ent_coef", "num_items_value", "norm_scale"}


def build(label, fn, constexprs, num_warps):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "mask_ptr":
            sig[name] = "*u8"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=target,
                       options=dict(num_warps=num_warps, num_stages=1))
    return dict(label=label, ptx_target=".target sm_90" in k.asm.get("ptx", ""), cubin_bytes=len(k.asm.get("cubin", b"")))


out = []
everything = dict(HAS_REF=True, HAS_ENT=True, HAS_ISW=True, KL_RATIO=True, NEED_GENT=True)
nothing = dict(HAS_REF=False, HAS_ENT=False, HAS_ISW=False, KL_RATIO=False, NEED_GENT=False)
for method in (K.PPO, K.SAPO, K.CISPO, K.GSPO, K.REINFORCE):
    for agg, kl, flags, per_row, dual, block in ((K.SEQ_MEAN_TOKEN_MEAN, K.K3, everything, True, True, 1024),
                                                 (K.TOKEN_MEAN, K.K1, nothing, False, False, 256)):
        c = dict(METHOD=method, AGG=agg, KL_EST=kl, HAS_DUAL=dual and method in (K.PPO, K.GSPO),
                 ADV_PER_ROW=per_row, BLOCK_T=block, **flags)
        out.append(build(f"fwd {c}", K._policy_loss_fwd_kernel, c, 8 if block > 512 else 4))
for agg in (K.TOKEN_MEAN, K.SEQ_MEAN_TOKEN_SUM_NORM):
    for from_ptr in (False, True):
        c = dict(AGG=agg, NUM_ITEMS_FROM_PTR=from_ptr, BLOCK_B=256)
        out.append(build(f"finalize {c}", K._policy_loss_finalize_kernel, c, 4))
print(json.dumps(out))
"""


def test_policy_loss_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"sm_90 compilation failed:\n{proc.stderr[-6000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 14
    for r in results:
        assert r["ptx_target"] and r["cubin_bytes"] > 0, r["label"]
