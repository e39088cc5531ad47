"""The `cpu` backend at every ISA level of its vectorized row loops that this machine runs
(csrc/common/vocab_rows.h: baseline, AVX2, AVX-512; the rest of the suite runs only the best one).
Each level against the float64 reference under the tolerance rule, on vocabularies that are not
multiples of the SIMD width or of the 256-logit sum block, with a temperature, |z| ~ 1e3 and a
NaN row; the checks are the op test modules' own."""

import pytest
import torch
import test_linear_kl as kl_tests
import test_linear_kl_loss as kl_loss_tests
import test_linear_logprobs as lp_tests
import test_linear_policy_loss as policy_tests
import test_numerics

import erpd
from erpd import _ext, reference
from erpd.testing import make_kl_teacher, make_linear_inputs, make_linear_policy_inputs

pytestmark = pytest.mark.skipif(not _ext.has_cpu(), reason="erpd._C is not built")

ISAS = _ext._C.cpu_isas() if _ext.has_cpu() else []


@pytest.fixture(params=ISAS)
def isa(request):
    before = _ext.cpu_isa()
    _ext._C.set_cpu_isa(request.param)
    assert _ext.cpu_isa() == request.param
    yield request.param
    _ext._C.set_cpu_isa(before)


def test_unknown_level_is_refused():
    with pytest.raises(ValueError, match="default, avx2 or avx512"):
        _ext._C.set_cpu_isa("sse9")
    assert "default" in ISAS  # the baseline always runs


@pytest.mark.parametrize("v", [1, 7, 255, 1001, 4099])
def test_linear_logprobs(isa, v):
    lp_tests.check_backend(make_linear_inputs(37, 48, v, seed=v, bias=True), "cpu", temperature=0.7, seed=v)


def test_linear_logprobs_extreme_logits_and_nan_row(isa):
    lp_tests.test_invariants_and_extreme_logits("cpu")
    test_numerics.test_extreme_logits_linear_logprobs("cpu")  # |t z| ~ 6e4
    lp_tests.test_nan_row_stays_in_its_row("cpu")


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("v", [7, 1001])
def test_linear_kl(isa, direction, v):
    x = make_linear_inputs(29, 40, v, seed=v + 1)
    kl_tests.check_kl(x, make_kl_teacher(x, "fused", seed=v + 2), "cpu", direction=direction, temperature=0.8)


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
def test_linear_kl_reduced(isa, direction):
    """The grads-in-forward form: the statistics and dz of each row in one visit."""
    x = make_linear_inputs(29, 40, 1001, bias=True, ignore_frac=0.2, seed=3)
    kl_loss_tests.check_loss(x, make_kl_teacher(x, "fused", seed=4), "cpu", "mean", direction=direction, beta=0.3,
                             temperature=0.8)


def test_linear_kl_extreme_logits_and_nan_row(isa):
    kl_tests.test_extreme_logits_stay_finite("cpu")
    test_numerics.test_extreme_logits_linear_kl("cpu")
    kl_tests.test_nan_row_stays_in_its_row("cpu")


def test_linear_policy_loss(isa):
    x = make_linear_policy_inputs(4, 13, 32, 1001, seed=5, ref=True)
    policy_tests.check_backend(x, "cpu", method="ppo", kl_coef=0.1, entropy_coef=0.01)


def test_exact_logits_leave_only_the_epilogue_error(isa):
    """H = 1 and power-of-two hidden states make every logit exact in fp32, so what differs from
    float64 is the epilogue's own error (exp, sums, log): a few ulps, far below the tolerance rule
    of the tests above, which a GEMM's rounding dominates."""
    g = torch.Generator().manual_seed(11)
    v = 4099
    weight = (torch.randn(v, 1, generator=g) * 3).requires_grad_()
    hidden = (2.0 ** torch.randint(-2, 3, (48, 1), generator=g).float()).requires_grad_()
    targets = torch.randint(0, v, (48,), generator=g)
    lp, ent = erpd.linear_logprobs(hidden, weight, targets, with_entropy=True, temperature=0.75, backend="cpu")
    ref_lp, ref_ent = reference.linear_logprobs(hidden.double(), weight.double(), targets, with_entropy=True,
                                                temperature=0.75)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-6, atol=1e-6)
    gh, gw = torch.autograd.grad((lp + ent).sum(), (hidden, weight))
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref_gh, ref_gw = torch.autograd.grad(
        sum(reference.linear_logprobs(h64, w64, targets, with_entropy=True, temperature=0.75)).sum(), (h64, w64))
    torch.testing.assert_close(gh.double(), ref_gh, rtol=1e-5, atol=1e-5)  # summed by a GEMM
    torch.testing.assert_close(gw.double(), ref_gw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
def test_exact_logits_kl(isa, direction):
    """The same for the KL row loops (jsd: its exp and log polynomials): exact student and
    teacher logits."""
    g = torch.Generator().manual_seed(12)
    v = 4099
    pow2 = lambda *s: 2.0 ** torch.randint(-2, 2, s, generator=g).float()  # noqa: E731
    w, tw = torch.randn(v, 1, generator=g) * 2, torch.randn(v, 1, generator=g) * 2
    h, th = pow2(40, 1), pow2(40, 1)
    targets = torch.randint(0, v, (40,), generator=g)
    kl = erpd.linear_kl(h, w, targets, teacher_hidden=th, teacher_weight=tw, direction=direction, backend="cpu")
    ref = reference.linear_kl(h.double(), w.double(), targets, teacher_hidden=th.double(),
                              teacher_weight=tw.double(), direction=direction)
    torch.testing.assert_close(kl.double(), ref, rtol=1e-6, atol=1e-6)
    # The gradient row loops, through the reduced form (its dz feeds one GEMM with H = 1).
    wg, w64 = w.clone().requires_grad_(), w.double().requires_grad_()
    loss = erpd.linear_kl(h, wg, targets, teacher_hidden=th, teacher_weight=tw, direction=direction,
                          reduction="sum", backend="cpu")
    ref = reference.linear_kl(h.double(), w64, targets, teacher_hidden=th.double(), teacher_weight=tw.double(),
                              direction=direction).sum()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    (grad,), (ref_grad,) = torch.autograd.grad(loss, wg), torch.autograd.grad(ref, w64)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
