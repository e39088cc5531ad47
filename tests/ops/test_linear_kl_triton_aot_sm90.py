"""Compile-only guard for the GPU path of `erpd.kernels.linear_kl` (see
test_linear_logprobs_triton_aot_sm90.py, whose child-process helpers this reuses).

Builds the real GPU variants for an H100 (sm_90) with the launchers' constexprs and tile
configs: the three modes, fused and dense teachers (fp32 dense logits under 16-bit students),
split and unsplit forwards, both passes of the jsd forward, ragged hidden sizes, and the
combine kernel's passes. Checks PTX for sm_90, a cubin, shared memory within an H100's, and
wgmma for 16-bit operands.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

pytestmark = pytest.mark.slow  # a child process compiles every GPU variant: tens of seconds on 2 cores

from test_linear_logprobs_triton_aot_sm90 import H100_MAX_SHARED_BYTES, compile_for_sm90  # noqa: E402

_BODY = r"""
from erpd.kernels import linear_kl as K

common = dict(UPCAST=False, DOT_PRECISION=K._dot_precision(False))
FUSED = dict(DENSE_TEACHER=False, HAS_TBIAS=True)
DENSE = dict(DENSE_TEACHER=True, HAS_TBIAS=False)


def ptr_types(tl_type, dtype):
    # The fused form passes teacher_hidden as the (unused) dense-logits pointer.
    return {"tl_ptr": tl_type or "*" + TRITON_DTYPE[dtype]}


def aligned(extra):
    # H / HT are multiples of 16 exactly when the launch would see them so (EVEN_K*).
    return tuple(n for n, flag in (("H", "EVEN_K"), ("HT", "EVEN_KT")) if extra[flag])


out = []
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    full = dtype != torch.float16  # fp16 takes bf16's code path: one forward and one backward
    fwd_variants = [
        # (n, extra constexprs, dense-logits pointer type)
        (4096, dict(MODE=0, PASS=1, HAS_BIAS=True, FINALIZE=False, EVEN_K=True, EVEN_KT=True, **FUSED), None),
    ]
    if full:
        fwd_variants += [
            (100, dict(MODE=1, PASS=1, HAS_BIAS=False, FINALIZE=True, EVEN_K=False, EVEN_KT=True, **DENSE), "*fp32"),
            (4096, dict(MODE=2, PASS=1, HAS_BIAS=True, FINALIZE=False, EVEN_K=True, EVEN_KT=False, **FUSED), None),
            (4096, dict(MODE=2, PASS=2, HAS_BIAS=True, FINALIZE=False, EVEN_K=True, EVEN_KT=False, **FUSED), None),
        ]
    for n, extra, tl_type in fwd_variants:
        tiles, opts = split(K.fwd_config(n, dtype, False))
        out.append(build(f"fwd n={n} {extra}", K._linear_kl_fwd_kernel, dtype, dict(common, **extra, **tiles), opts,
                         aligned_ints=aligned(extra), ptr_types=ptr_types(tl_type, dtype)))
    bwd_variants = [
        (dict(MODE=0, HAS_BIAS=True, NEED_DH=True, NEED_DW=True, NEED_DB=True, EVEN_K=True, EVEN_KT=True, **FUSED), None),
    ]
    if full:
        bwd_variants += [
            (dict(MODE=1, HAS_BIAS=False, NEED_DH=True, NEED_DW=False, NEED_DB=False, EVEN_K=False, EVEN_KT=True, **DENSE),
             "*fp32"),
            (dict(MODE=2, HAS_BIAS=True, NEED_DH=True, NEED_DW=True, NEED_DB=True, EVEN_K=True, EVEN_KT=False, **FUSED),
             None),
        ]
    tiles, opts = split(K.bwd_config(dtype, False))
    for extra, tl_type in bwd_variants:
        out.append(build(f"bwd {extra}", K._linear_kl_bwd_kernel, dtype, dict(common, **extra, **tiles), opts,
                         aligned_ints=aligned(extra), ptr_types=ptr_types(tl_type, dtype)))
for mode, pass_ in ((0, 1), (2, 1), (2, 2)):
    out.append(build(f"combine mode={mode} pass={pass_}", K._linear_kl_combine_kernel, torch.float32,
                     dict(MODE=mode, PASS=pass_, BLOCK=K.COMBINE_BLOCK), dict(num_warps=4, num_stages=1),
                     aligned_ints=()))
print(json.dumps(out))
"""


def test_linear_kl_triton_kernels_compile_for_sm90(tmp_path):
    results = compile_for_sm90(tmp_path, _BODY)
    assert len(results) == 2 * (4 + 3) + 2 + 3
    for r in results:
        what = f"{r['label']} [{r['dtype']}]"
        assert r["ptx_target"], f"{what}: PTX is not for sm_90"
        assert r["cubin_bytes"] > 0, f"{what}: no cubin"
        assert r["shared"] <= H100_MAX_SHARED_BYTES, f"{what}: needs {r['shared']} B of shared memory"
        if r["dtype"] != "fp32" and not r["label"].startswith("combine"):
            assert r["wgmma"], f"{what}: 16-bit GEMMs do not use wgmma tensor-core instructions"
