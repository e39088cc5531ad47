"""Numerical robustness of the fused ops, on every CPU backend.

* extreme logits (|z| up to 1e4 at temperature 0.05, i.e. scaled logits up to 2e5): finite, and
  within the tolerance rule of `erpd.testing.assert_within_rule` (error <= 2x plain fp32
  PyTorch's error vs float64 + floor), forward and backward;
* a masked vocabulary (-inf logits, from a bias or the teacher's logits): the float64 op on the
  vocabulary without those ids, forward and backward;
* vocabularies that are not a multiple of any block size (1, 3, 127, 129, 1001), and one of
  262147 > 2^18 columns (cpu backend; the Triton interpreter would take minutes there);
* invariants: log-probs <= 0, entropy in [0, log V], KL >= 0 (also when the teacher is the
  student, where rounding could make it slightly negative);
* determinism: the cpu backend is bitwise identical run to run at a fixed thread count.

int64 offsets: a case with N*V > 2^31 elements needs 8 GiB of fp32 logits and is not run. The
[N, V] products are instead checked by reading the code (every row * V, row * H, col * H offset is
int64 in csrc/ and kernels/), and the large-V test below gathers targets in the last columns of
the last rows, where a truncated offset would read the wrong element.
"""

import math

import pytest
import torch

import erpd
from erpd import reference
from erpd.testing import (
    assert_within_rule,
    make_kl_teacher,
    make_linear_inputs,
    naive_linear_kl,
    naive_linear_logprobs,
)

BACKENDS = ["torch", *[b for b in erpd.available("cpu") if b != "torch"]]
FUSED = [b for b in BACKENDS if b != "torch"]


def _logprobs(x, backend, **kw):
    c = x.clone()
    lp, ent = erpd.linear_logprobs(c.hidden, c.weight, c.targets, bias=c.bias, with_entropy=True, backend=backend, **kw)
    (lp.sum() + 0.5 * ent.sum()).backward()
    return lp.detach(), ent.detach(), c.hidden.grad, c.weight.grad


def _reference(x, **kw):
    d = x.to64()
    lp, ent = reference.linear_logprobs(d.hidden, d.weight, d.targets, bias=d.bias, with_entropy=True, **kw)
    (lp.sum() + 0.5 * ent.sum()).backward()
    return lp.detach(), ent.detach(), d.hidden.grad, d.weight.grad


def _naive(x, temperature=1.0):
    c = x.clone()
    lp, ent = naive_linear_logprobs(c.hidden, c.weight, c.targets, c.bias, temperature=temperature)
    (lp.sum() + 0.5 * ent.sum()).backward()
    return lp.detach(), ent.detach(), c.hidden.grad, c.weight.grad


# --------------------------------------------------------------------------------------------
# masked vocabulary: -inf logits are zero-probability tokens
# --------------------------------------------------------------------------------------------

V_MASKED = 700
# Whole leading blocks (every Triton tile of the first 256 columns sees only -inf, so a block's
# max is -inf) and then scattered ids.
MASKED = torch.cat([torch.arange(0, 300), torch.arange(301, V_MASKED, 7)])
_kept = torch.ones(V_MASKED, dtype=torch.bool)
_kept[MASKED] = False
KEPT = _kept.nonzero().squeeze(1)
NEG_INF = float("-inf")


def _masked_inputs(seed):
    x = make_linear_inputs(9, 24, V_MASKED, bias=True, seed=seed, ignore_frac=0.2)
    kept_targets = KEPT[torch.randint(0, len(KEPT), x.targets.shape, generator=torch.Generator().manual_seed(seed))]
    targets = torch.where(x.targets == -100, x.targets, kept_targets)
    bias = x.bias.detach().clone()
    bias[MASKED] = NEG_INF
    return type(x)(x.hidden, x.weight, targets, bias.requires_grad_())


def _on_kept(x):
    """The same inputs on the vocabulary without the masked ids (targets renumbered): the truth for
    -inf logits, computed with no -inf anywhere."""
    new_id = torch.full((V_MASKED,), -1, dtype=torch.long)
    new_id[KEPT] = torch.arange(len(KEPT))
    targets = torch.where(x.targets == -100, x.targets, new_id[x.targets.clamp_min(0)])
    d = x.to64()
    return type(x)(d.hidden, d.weight.detach()[KEPT].requires_grad_(), targets, d.bias.detach()[KEPT].requires_grad_())


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_linear_logprobs(backend):
    """A bias of -inf on part of the vocabulary (padded or banned ids): log-probs, entropy and
    every gradient equal the float64 op on the vocabulary without those ids, and the masked rows of
    the weight and bias get zero gradient (not NaN: their p log p and its derivative are 0 · inf)."""
    x = _masked_inputs(21)
    got = _logprobs(x, backend)
    kept = _on_kept(x)
    lp, ent = reference.linear_logprobs(kept.hidden, kept.weight, kept.targets, bias=kept.bias, with_entropy=True)
    (lp.sum() + 0.5 * ent.sum()).backward()
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[0], lp.float(), **tol)
    torch.testing.assert_close(got[1], ent.float(), **tol)
    torch.testing.assert_close(got[2], kept.hidden.grad.float(), **tol)
    torch.testing.assert_close(got[3][KEPT], kept.weight.grad.float(), **tol)
    assert (got[3][MASKED] == 0).all()


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_linear_kl(backend, direction):
    """-inf logits in the KL. (1) Student and teacher masked on the same ids: every direction equals
    the float64 op on the vocabulary without them. (2) Only the teacher masked (a top-k or top-p
    filtered teacher): forward KL and JSD are finite and equal the float64 reference, gradients too;
    the reverse KL is +inf (the student puts mass where the teacher has none), as in the reference."""
    x = _masked_inputs(22)
    teacher = make_kl_teacher(x, "dense", seed=4)["teacher_logits"]
    t_masked = teacher.clone()
    t_masked[:, MASKED] = NEG_INF
    tol = dict(rtol=1e-4, atol=1e-5)

    def run(fn, y, t_logits, **kw):
        out = fn(y.hidden, y.weight, y.targets, bias=y.bias, teacher_logits=t_logits, direction=direction, beta=0.3, **kw)
        out.sum().backward()
        return out.detach(), y.hidden.grad, y.weight.grad

    got = run(erpd.linear_kl, x.clone(), t_masked, backend=backend)
    kept = _on_kept(x)
    want = run(reference.linear_kl, kept, t_masked[:, KEPT].double())
    for g, w in zip(got[:2], want[:2]):
        torch.testing.assert_close(g, w.float(), **tol)
    torch.testing.assert_close(got[2][KEPT], want[2].float(), **tol)
    assert (got[2][MASKED] == 0).all()

    y = x.clone()
    y.bias = x.bias.detach().nan_to_num(neginf=-1.0).requires_grad_()  # the student unmasked
    got = run(erpd.linear_kl, y, t_masked, backend=backend)
    d = y.to64()
    want = run(reference.linear_kl, d, t_masked.double())
    valid = x.targets != -100
    if direction == "reverse":
        assert torch.isinf(got[0][valid]).all() and torch.isinf(want[0][valid]).all()
        return
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w.float(), **tol)


# --------------------------------------------------------------------------------------------
# extreme logits
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_linear_logprobs(backend):
    x = make_linear_inputs(12, 32, 257, bias=True, logit_std=3000.0, seed=11, ignore_frac=0.2)
    z = torch.nn.functional.linear(x.hidden, x.weight, x.bias)
    assert z.abs().max() > 5e3  # the test is about logits this large
    got, want, base = _logprobs(x, backend, temperature=0.05), _reference(x, temperature=0.05), _naive(x, 0.05)
    for name, g, w, b in zip(("logprobs", "entropy", "grad_hidden", "grad_weight"), got, want, base):
        assert torch.isfinite(g).all(), f"{backend} {name} not finite"
        assert_within_rule(g, w, b, name=f"{backend} {name}")
    assert (got[0] <= 0).all() and (got[1] >= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_linear_kl(backend):
    x = make_linear_inputs(10, 32, 257, logit_std=3000.0, seed=12)
    teacher = dict(teacher_logits=torch.randn(10, 257, generator=torch.Generator().manual_seed(3)) * 3000.0)

    def run(fn, y, **kw):
        out = fn(y.hidden, y.weight, y.targets, temperature=0.05, direction="jsd", beta=0.4, **teacher, **kw)
        out.sum().backward()
        return out.detach(), y.hidden.grad

    got = run(erpd.linear_kl, x.clone(), backend=backend)
    d = x.to64()
    want = run(reference.linear_kl, d)
    n = x.clone()
    base = run(lambda h, w, t, **kw: naive_linear_kl(h, w, t, **kw), n)
    for name, g, w, b in zip(("kl", "grad_hidden"), got, want, base):
        assert torch.isfinite(g).all(), f"{backend} {name} not finite"
        assert_within_rule(g, w, b, name=f"{backend} {name}")
    assert (got[0] >= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_linear_policy_loss(backend):
    x = make_linear_inputs((2, 6), 32, 257, logit_std=3000.0, seed=13)
    g = torch.Generator().manual_seed(5)
    adv, mask = torch.randn(2, generator=g), torch.rand(2, 6, generator=g) > 0.2
    lp64, _ = reference.linear_logprobs(x.hidden.double(), x.weight.double(), x.targets, temperature=0.05)
    old = (lp64 + 0.1 * torch.randn(2, 6, generator=g, dtype=torch.float64)).float()
    c = x.clone()
    loss, metrics = erpd.linear_policy_loss(c.hidden, c.weight, c.targets, old, adv, mask, temperature=0.05,
                                            backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(c.hidden.grad).all() and torch.isfinite(c.weight.grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())


# --------------------------------------------------------------------------------------------
# vocabulary sizes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v", [1, 3, 127, 129, 1001])
@pytest.mark.parametrize("backend", FUSED)
def test_vocab_not_a_multiple_of_any_block(backend, v):
    x = make_linear_inputs(9, 24, v, bias=True, seed=v)
    got, want, base = _logprobs(x, backend), _reference(x), _naive(x)
    for name, g, w, b in zip(("logprobs", "entropy", "grad_hidden", "grad_weight"), got, want, base):
        assert_within_rule(g, w, b, name=f"{backend} V={v} {name}")
    if v == 1:  # one token: probability 1
        assert (got[0] == 0).all() and (got[1] == 0).all()


def test_large_vocab_few_rows_cpu():
    """V = 262147 > 2^18 with three rows, targets in the last columns, on the cpu backend."""
    if "cpu" not in FUSED:
        pytest.skip("erpd._C not built")
    v = 262_147
    x = make_linear_inputs(3, 16, v, seed=21)
    x.targets = torch.tensor([v - 1, v - 2, 2**18 + 1])
    got, want, base = _logprobs(x, "cpu"), _reference(x), _naive(x)
    for name, g, w, b in zip(("logprobs", "entropy", "grad_hidden", "grad_weight"), got, want, base):
        assert_within_rule(g, w, b, name=f"V={v} {name}")
    assert (got[1] <= math.log(v)).all()
    # The KL over the same vocabulary (dense teacher [3, V]).
    t_logits = torch.randn(3, v, generator=torch.Generator().manual_seed(1)) * 2
    kl = erpd.linear_kl(x.hidden.detach(), x.weight.detach(), teacher_logits=t_logits, backend="cpu")
    kl64 = reference.linear_kl(x.hidden.detach().double(), x.weight.detach().double(), teacher_logits=t_logits.double())
    base_kl = naive_linear_kl(x.hidden.detach(), x.weight.detach(), teacher_logits=t_logits)
    assert_within_rule(kl, kl64, base_kl, name="kl V=262147")


# --------------------------------------------------------------------------------------------
# invariants
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("logit_std", [0.01, 3.0, 300.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_logprob_entropy_kl_bounds(backend, logit_std):
    v = 301
    x = make_linear_inputs(20, 16, v, bias=True, logit_std=logit_std, seed=int(logit_std * 100), ignore_frac=0.2,
                           requires_grad=False)
    lp, ent = erpd.linear_logprobs(x.hidden, x.weight, x.targets, bias=x.bias, with_entropy=True, backend=backend)
    assert (lp <= 0).all(), f"positive log-prob {lp.max().item()}"
    assert (ent >= 0).all() and (ent <= math.log(v) * (1 + 1e-6)).all(), (ent.min().item(), ent.max().item())
    for direction in ("forward", "reverse", "jsd"):
        for closeness in (0.0, 1.0):  # 1.0: the teacher is the student, the true KL is 0
            teacher = make_kl_teacher(x, "fused", closeness=closeness, bias=True, seed=3)
            kl = erpd.linear_kl(x.hidden, x.weight, x.targets, bias=x.bias, direction=direction, backend=backend,
                                **teacher)
            assert (kl >= 0).all(), f"{direction} closeness={closeness}: KL {kl.min().item()}"
            if closeness == 1.0:
                assert kl.max() < 1e-4


# --------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------


def _everything(backend):
    """Every output and gradient of the four ops on one fixed input."""
    x = make_linear_inputs((3, 5), 24, 1001, bias=True, seed=31, ignore_frac=0.2)
    out = list(_logprobs(x, backend))
    c = x.clone()
    teacher = make_kl_teacher(x, "fused", h=20, seed=4)
    kl = erpd.linear_kl(c.hidden, c.weight, c.targets, bias=c.bias, direction="jsd", backend=backend, **teacher)
    kl.sum().backward()
    out += [kl.detach(), c.hidden.grad, c.weight.grad, c.bias.grad]
    g = torch.Generator().manual_seed(6)
    old, adv, mask = -torch.rand(3, 5, generator=g) * 5, torch.randn(3, generator=g), torch.rand(3, 5, generator=g) > 0.2
    c = x.clone()
    loss, m = erpd.linear_policy_loss(c.hidden, c.weight, c.targets, old, adv, mask, bias=c.bias, entropy_coef=0.01,
                                      backend=backend)
    loss.backward()
    out += [loss.detach(), *m.values(), c.hidden.grad, c.weight.grad, c.bias.grad]
    lp = (-torch.rand(3, 5, generator=g) * 5).requires_grad_()
    loss, m = erpd.policy_loss(lp, old, adv, mask, method="gspo", backend=backend)
    loss.backward()
    out += [loss.detach(), *m.values(), lp.grad]
    return out


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_bitwise_deterministic_run_to_run(backend):
    """cpu (and torch) at a fixed thread count: identical bits run to run. Triton's backward
    accumulates with atomics in a scheduling-dependent order: not bitwise deterministic on a GPU
    (the interpreter happens to be), see README "Determinism"."""
    first, second = _everything(backend), _everything(backend)
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"output {i} differs between two identical runs"
