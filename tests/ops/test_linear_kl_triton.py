"""Kernel-level tests of the Triton `linear_kl` backend (erpd.kernels.linear_kl), called directly.

Every case compares kl and the gradients of hidden, weight and bias with the float64 reference
`erpd.reference.linear_kl` under the tolerance rule (erpd.testing.assert_within_rule): the
baseline is plain PyTorch in the input precision (logits in the input dtype, then a float32
log-softmax), as for linear_logprobs. Without CUDA the kernels run under the Triton interpreter
on the small "interp" shapes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from erpd import reference
from erpd.testing import LinearInputs, assert_within_rule, make_linear_inputs, shapes
from erpd.testing.shapes import by_name

K = pytest.importorskip("erpd.kernels.linear_kl")

DIRECTIONS = {0: "forward", 1: "reverse", 2: "jsd"}
BETA = 0.3  # jsd mixture weight; asymmetric so that swapping the two sides would be caught
IGNORE = -100
# oddv (V = 4099) costs seconds per case under the interpreter: the slow tier.
INTERP_SHAPES = [pytest.param(s, marks=pytest.mark.slow) if s.name == "oddv" else s for s in shapes("interp")]


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------
# inputs and the three providers (kernel, float64 reference, plain-PyTorch baseline)
# --------------------------------------------------------------------------------------------


def make_case(n, h, v, *, ht=None, dense=False, dense_dtype=None, dtype=torch.float32, bias=True,
              ignore_frac=0.2, logit_std=3.0, seed=0, device=None):
    """Student inputs, and a teacher (fused: its own hidden size `ht`; dense: [N, V] logits)."""
    device = device or _device()
    x = make_linear_inputs(n, h, v, dtype=dtype, device=device, bias=bias, ignore_frac=ignore_frac,
                           ignore_index=IGNORE, logit_std=logit_std, seed=seed)
    tx = make_linear_inputs(n, ht or h, v, dtype=dtype, device=device, bias=bias, logit_std=logit_std,
                            seed=seed + 1000, requires_grad=False)
    if dense:
        # A realistic dense teacher: its own GEMM's logits, stored in `dense_dtype`.
        logits = F.linear(tx.hidden.float(), tx.weight.float(), None if tx.bias is None else tx.bias.float())
        teacher = dict(teacher_logits=logits.to(dense_dtype or dtype))
    else:
        teacher = dict(teacher_hidden=tx.hidden, teacher_weight=tx.weight, teacher_bias=tx.bias)
    return x, teacher


def _teacher_positional(teacher):
    return (teacher.get("teacher_hidden"), teacher.get("teacher_weight"), teacher.get("teacher_bias"),
            teacher.get("teacher_logits"))


def run_kernel(x: LinearInputs, teacher, mode, g, *, temperature=0.7, beta=BETA, need_h=True, need_w=True):
    """The Triton forward then backward; returns (kl, lse_s, lse_t, aux, grads)."""
    args = (x.hidden.detach(), x.weight.detach(), None if x.bias is None else x.bias.detach(), *_teacher_positional(teacher))
    kl, lse_s, lse_t, aux = K.linear_kl_fwd(*args, x.targets, 1.0 / temperature, IGNORE, mode, beta)
    gh, gw, gb = K.linear_kl_bwd(
        *args, x.targets, lse_s, lse_t, aux, g.float().contiguous(), 1.0 / temperature, IGNORE, mode, beta, need_h, need_w,
    )
    return kl, lse_s, lse_t, aux, dict(hidden=gh, weight=gw, bias=gb)


def _grads(x: LinearInputs, kl, g):
    (kl * g.to(kl.dtype)).sum().backward()
    return {k: getattr(x, k).grad for k in ("hidden", "weight", "bias") if getattr(x, k) is not None}


def run_reference(x: LinearInputs, teacher, mode, g, *, temperature=0.7, beta=BETA):
    """erpd.reference.linear_kl on float64 copies of the same values."""
    x64 = x.to64()
    t64 = {k: v.detach().double() for k, v in teacher.items() if v is not None}
    kl = reference.linear_kl(x64.hidden, x64.weight, x64.targets, x64.bias, **t64, direction=DIRECTIONS[mode],
                             beta=beta, temperature=temperature, ignore_index=IGNORE)
    return kl.detach(), _grads(x64, kl, g)


def run_naive(x: LinearInputs, teacher, mode, g, *, temperature=0.7, beta=BETA):
    """Plain PyTorch in the input precision: both logits in the input dtype (16-bit logits are
    rounded), then float32 log-softmaxes and the reference's divergence formula."""
    x = x.clone()
    zs = F.linear(x.hidden, x.weight, x.bias).float() / temperature
    if "teacher_logits" in teacher:
        zt = teacher["teacher_logits"].float() / temperature
    else:
        zt = F.linear(teacher["teacher_hidden"], teacher["teacher_weight"], teacher["teacher_bias"]).float() / temperature
    kl = reference._kl_rows(zs.log_softmax(-1), zt.log_softmax(-1), DIRECTIONS[mode], beta)
    kl = torch.where(x.targets != IGNORE, kl, 0.0)
    return kl.detach(), _grads(x, kl, g)


def upstream(n, seed, device=None):
    """Random grad_kl (never all ones), positive and negative."""
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device or _device()) * 2


def check(x, teacher, mode, *, temperature=0.7, beta=BETA, seed=0):
    """Kernel vs float64 reference, forward and backward, under the tolerance rule."""
    g = upstream(x.targets.shape[0], seed + 17, x.hidden.device)
    kl, lse_s, lse_t, aux, grads = run_kernel(x, teacher, mode, g, temperature=temperature, beta=beta)
    ref_kl, ref_grads = run_reference(x, teacher, mode, g, temperature=temperature, beta=beta)
    base_kl, base_grads = run_naive(x, teacher, mode, g, temperature=temperature, beta=beta)
    what = f"mode {mode} ({DIRECTIONS[mode]}) {'dense' if 'teacher_logits' in teacher else 'fused'} {x.hidden.dtype}"

    for t in (kl, lse_s, lse_t, aux):
        assert t.dtype == torch.float32 and t.shape == ref_kl.shape
    assert_within_rule(kl, ref_kl, base_kl, name=f"{what}: kl")
    # A divergence: non-negative up to rounding.
    assert (kl >= -1e-5 * max(1.0, ref_kl.abs().max().item())).all(), f"{what}: negative kl {kl.min().item()}"
    ignored = x.targets == IGNORE
    assert (kl[ignored] == 0).all() and (aux[ignored] == 0).all(), f"{what}: ignored rows must give 0"
    for name, ref in ref_grads.items():
        got = grads[name]
        want_dtype = torch.float32 if name == "bias" else getattr(x, name).dtype
        assert got.dtype == want_dtype, f"{what}: grad of {name} has dtype {got.dtype}"
        assert_within_rule(got, ref, base_grads[name], name=f"{what}: d{name}")
    assert (grads["hidden"][ignored] == 0).all(), f"{what}: ignored rows got a hidden gradient"
    return kl, lse_s, lse_t, aux, grads


# --------------------------------------------------------------------------------------------
# accuracy against the float64 reference
# --------------------------------------------------------------------------------------------


def _teacher_hidden_size(h):
    # Differs from H, and of the other parity w.r.t. the interpreter's BLOCK_K = 64 (ragged and
    # even K-loops on the two GEMMs).
    return 64 if h % 64 else 48


@pytest.mark.parametrize("dense", [False, True], ids=["fused", "dense"])
@pytest.mark.parametrize("mode", [0, 1, 2], ids=DIRECTIONS.get)
@pytest.mark.parametrize("shape", INTERP_SHAPES, ids=lambda s: s.id)
def test_matches_reference(shape, mode, dense):
    # V=128 fits one forward split (the kernel finalizes); 1001 and 4099 go through the combine.
    x, teacher = make_case(shape.n, shape.h, shape.v, ht=_teacher_hidden_size(shape.h), dense=dense,
                           bias=shape.v != 4099, seed=shape.v + mode)
    kl, lse_s, lse_t, aux, _ = check(x, teacher, mode, seed=mode)

    # The statistics the backward relies on.
    t = 1 / 0.7
    zs = F.linear(x.hidden.double(), x.weight.double(), None if x.bias is None else x.bias.double()) * t
    if dense:
        zt = teacher["teacher_logits"].double() * t
    else:
        zt = F.linear(teacher["teacher_hidden"].double(), teacher["teacher_weight"].double(),
                      None if teacher["teacher_bias"] is None else teacher["teacher_bias"].double()) * t
    torch.testing.assert_close(lse_s.double(), zs.logsumexp(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_t.double(), zt.logsumexp(-1), rtol=1e-5, atol=1e-5)
    valid = x.targets != IGNORE
    if mode == 2:
        lq_s, lq_t = zs.log_softmax(-1), zt.log_softmax(-1)
        log_m = torch.logaddexp(lq_s + math.log1p(-BETA), lq_t + math.log(BETA))
        want = torch.where(valid, (lq_s.exp() * (lq_s - log_m)).sum(-1), 0.0)
        torch.testing.assert_close(aux.double(), want, rtol=1e-4, atol=1e-5)
    else:
        assert torch.equal(aux, kl)


@pytest.mark.parametrize("dense", [False, True], ids=["fused", "dense"])
@pytest.mark.parametrize(
    "mode, dtype",
    # fp16 runs bf16's code path: one mode is enough.
    [(0, torch.bfloat16), (1, torch.bfloat16), *(pytest.param(2, d, marks=pytest.mark.slow) for d in (torch.bfloat16, torch.float16))],
    ids=lambda p: DIRECTIONS[p] if isinstance(p, int) else str(p),
)
def test_half_precision(mode, dtype, dense):
    s = by_name("odd")
    x, teacher = make_case(s.n, s.h, s.v, ht=64, dense=dense, dtype=dtype, seed=7 + mode)
    check(x, teacher, mode, seed=7)


@pytest.mark.parametrize("logits_dtype", [torch.float16, torch.float64], ids=str)
def test_dense_teacher_in_another_dtype(logits_dtype):
    """Dense teacher logits may come in any float dtype, independent of the student's."""
    s = by_name("odd")
    x, teacher = make_case(s.n, s.h, s.v, dense=True, dense_dtype=logits_dtype, seed=9)
    check(x, teacher, 1, seed=9)


@pytest.mark.parametrize("mode", [0, 1, 2], ids=DIRECTIONS.get)
def test_extreme_logits(mode):
    """|z| ~ 1e3 on both sides. The forward stays within the rule: the KL sum is kept relative to
    the running maxima and the jsd pass uses (m, log s), so no two numbers of size |z| are
    subtracted. The backward only receives lse = m + log s rounded to fp32 (the op's contract),
    which shifts every log p of a row by up to half an ulp of |lse| (~3e-5 here), a few times
    what plain PyTorch's log-softmax loses; linear_logprobs has the same bound. So the gradients
    get a looser factor here, still far below what a wrong formula would give."""
    x, teacher = make_case(33, 64, 1001, dense=mode == 1, ht=96, logit_std=300.0, seed=23)
    g = upstream(33, 23)
    kl, lse_s, lse_t, aux, grads = run_kernel(x, teacher, mode, g, temperature=0.5)
    ref_kl, ref_grads = run_reference(x, teacher, mode, g, temperature=0.5)
    base_kl, base_grads = run_naive(x, teacher, mode, g, temperature=0.5)
    assert torch.isfinite(kl).all() and torch.isfinite(lse_s).all() and torch.isfinite(lse_t).all()
    assert_within_rule(kl, ref_kl, base_kl, name=f"mode {mode}: kl")
    for name, ref in ref_grads.items():
        assert_within_rule(grads[name], ref, base_grads[name], name=f"mode {mode}: d{name}", factor=8.0)


@pytest.mark.parametrize("mode", [0, 1, 2], ids=DIRECTIONS.get)
@pytest.mark.parametrize("dense", [False, True], ids=["fused", "dense"])
def test_teacher_equal_to_student_gives_zero(mode, dense):
    x = make_linear_inputs(37, 96, 1001, bias=True, ignore_frac=0.2, ignore_index=IGNORE, seed=31, device=_device())
    if dense:
        teacher = dict(teacher_logits=F.linear(x.hidden, x.weight, x.bias).detach())
    else:
        teacher = dict(teacher_hidden=x.hidden.detach(), teacher_weight=x.weight.detach(), teacher_bias=x.bias.detach())
    g = upstream(37, 31)
    kl, lse_s, lse_t, aux, grads = run_kernel(x, teacher, mode, g)
    assert kl.abs().max().item() < 2e-6 and aux.abs().max().item() < 2e-6
    torch.testing.assert_close(lse_s, lse_t, rtol=0, atol=1e-5)
    # The gradient vanishes at the minimum. Dense: torch's GEMM rounds the teacher's logits
    # differently from the kernel's recomputed student logits (~1e-6 apart), and dW sums that
    # over the rows.
    bound = 1e-4 if dense else 1e-5
    for name, gr in grads.items():
        assert gr.abs().max().item() < bound, f"d{name} = {gr.abs().max().item():.2e} at teacher == student"


def test_teacher_offset_by_a_constant_gives_zero():
    """Softmax is shift-invariant: a dense teacher equal to the student's logits plus 512 is the
    same distribution, so the KL is 0. Summing p^T (zT - zS) and subtracting lse_T - lse_S
    instead would leave an error of ~1e-4 (one ulp of 1024)."""
    x = make_linear_inputs(20, 64, 300, seed=37, device=_device())  # 2 forward splits (interpreter)
    zs = F.linear(x.hidden, x.weight).detach()
    zs = torch.round(zs * 256) / 256  # few mantissa bits: zs + 512 (and times 2) is exact in fp32
    for mode in (0, 1, 2):
        kl, *_ = run_offset(zs, mode)
        assert kl.abs().max().item() < 1e-5, f"mode {mode}: kl {kl.abs().max().item():.2e} for a shifted teacher"


def run_offset(zs, mode):
    """Student = identity head over the logits themselves (hidden = zs, weight = I), teacher =
    zs + 512 as dense logits."""
    n, v = zs.shape
    eye = torch.eye(v, device=zs.device)
    targets = torch.zeros(n, dtype=torch.long, device=zs.device)
    return K.linear_kl_fwd(zs, eye, None, None, None, None, zs + 512.0, targets, 2.0, IGNORE, mode, BETA)


# --------------------------------------------------------------------------------------------
# masking, requested gradients, edge cases
# --------------------------------------------------------------------------------------------


def test_all_rows_ignored():
    x, teacher = make_case(20, 32, 128, ht=48, seed=19)
    x.targets[:] = IGNORE
    for mode in (0, 1, 2):
        kl, _, _, aux, grads = run_kernel(x, teacher, mode, upstream(20, 19))
        assert (kl == 0).all() and (aux == 0).all()
        for name, gr in grads.items():
            assert (gr == 0).all(), f"mode {mode}: d{name} nonzero with every row ignored"


def test_requested_gradients_only():
    x, teacher = make_case(37, 32, 300, ht=64, bias=False, seed=41)
    g = upstream(37, 41)
    full = run_kernel(x, teacher, 2, g)[4]
    only_h = run_kernel(x, teacher, 2, g, need_w=False)[4]
    only_w = run_kernel(x, teacher, 2, g, need_h=False)[4]
    assert only_h["weight"].numel() == 0 and only_h["weight"].dtype == x.weight.dtype
    assert only_w["hidden"].numel() == 0 and only_w["hidden"].dtype == x.hidden.dtype
    assert full["bias"].numel() == 0 and full["bias"].dtype == torch.float32  # no bias given
    # The same atomics in the same order as the full run: bit-identical under the interpreter.
    torch.testing.assert_close(only_h["hidden"], full["hidden"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(only_w["weight"], full["weight"], rtol=1e-6, atol=1e-7)
    nothing = run_kernel(x, teacher, 0, g, need_h=False, need_w=False)[4]
    assert all(t.numel() == 0 for t in nothing.values())


def test_single_row_and_empty_batch():
    x, teacher = make_case(1, 32, 128, ht=64, ignore_frac=0.0, seed=43)
    check(x, teacher, 1, seed=43)
    e, et = make_case(0, 32, 128, ht=64, seed=43)
    kl, lse_s, lse_t, aux, grads = run_kernel(e, et, 2, upstream(0, 43))
    assert kl.shape == lse_s.shape == lse_t.shape == aux.shape == (0,)
    assert grads["hidden"].shape == (0, 32) and (grads["weight"] == 0).all() and (grads["bias"] == 0).all()


def test_bad_mode_or_beta_is_rejected():
    x, teacher = make_case(4, 32, 128, seed=47)
    args = (x.hidden.detach(), x.weight.detach(), x.bias.detach(), *_teacher_positional(teacher), x.targets, 1.0, IGNORE)
    with pytest.raises(ValueError, match="mode"):
        K.linear_kl_fwd(*args, 3, 0.5)
    with pytest.raises(ValueError, match="beta"):
        K.linear_kl_fwd(*args, 2, 1.0)


# --------------------------------------------------------------------------------------------
# GPU (skipped without CUDA): the real tile configs on a mid-size problem
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dense", [False, True], ids=["fused", "dense"])
@pytest.mark.parametrize("mode", [0, 1, 2], ids=DIRECTIONS.get)
def test_gpu(mode, dense, dtype):
    x, teacher = make_case(1024, 1024, 32000, ht=768, dense=dense, dtype=dtype, seed=53, device="cuda")
    check(x, teacher, mode, temperature=0.8, seed=53)
