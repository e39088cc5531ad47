"""Double backward: the fused backends refuse it loudly; the torch backend gives it exactly.

Every fused backward is a kernel, correct to first order only. Before erpd/ops/_autograd.py a
gradient taken with ``create_graph=True`` came back without a graph (or, on cpu, failed with an
unrelated ``mm(): functions with out=...`` error), so a gradient penalty built on it silently
lost its second-order term. Now differentiating such a gradient raises, naming the op, on every
op and every fused backend, whichever way the double backward is asked for.
"""

import pytest
import torch

import erpd
from erpd.testing import make_kl_teacher, make_linear_inputs, make_linear_policy_inputs, make_policy_inputs

N, H, V = 6, 8, 19


def _linear_logprobs(backend, dtype=torch.float32):
    x = make_linear_inputs(N, H, V, bias=True, dtype=dtype, seed=0)
    scale = torch.linspace(0.5, 1.5, N, dtype=dtype)

    def f(hidden, weight, bias):
        lp, ent = erpd.linear_logprobs(hidden, weight, x.targets, bias=bias, with_entropy=True, backend=backend)
        return (lp * scale).sum() + ent.sum()

    return "linear_logprobs", f, (x.hidden, x.weight, x.bias)


def _linear_kl(form, reduction=None):
    def make(backend, dtype=torch.float32):
        x = make_linear_inputs(N, H, V, bias=True, dtype=dtype, seed=1)
        teacher = make_kl_teacher(x, form, k=4)
        if form == "topk":
            teacher["teacher_topk"] = (teacher["teacher_topk"][0].to(dtype), teacher["teacher_topk"][1])
        direction = "forward" if form == "topk" else "jsd"

        def f(hidden, weight, bias):
            kl = erpd.linear_kl(hidden, weight, x.targets, bias=bias, direction=direction, beta=0.3, backend=backend,
                                reduction=reduction, **teacher)
            return kl if reduction else kl.sum()

        return "linear_kl", f, (x.hidden, x.weight, x.bias)

    return make


def _policy_loss(backend, dtype=torch.float32):
    x = make_policy_inputs(3, 5, seed=2, entropy=True, pad_frac=0.0)
    old, adv = x.old_logprobs.to(dtype), x.advantages.to(dtype)

    def f(logprobs, entropy):
        return erpd.policy_loss(logprobs, old, adv, x.mask, entropy=entropy, entropy_coef=0.1, backend=backend)[0]

    leaf = lambda t: t.detach().to(dtype).requires_grad_()  # noqa: E731
    return "policy_loss", f, (leaf(x.logprobs), leaf(x.entropy))


def _linear_policy_loss(method):
    def make(backend, dtype=torch.float32):
        x = make_linear_policy_inputs(2, 4, H, V, seed=3, bias=True, dtype=dtype)
        old, adv = x.old_logprobs.to(dtype), x.advantages.to(dtype)

        def f(hidden, weight, bias):
            return erpd.linear_policy_loss(hidden, weight, x.linear.targets, old, adv, x.mask, bias=bias, method=method,
                                           entropy_coef=0.05, backend=backend)[0]

        return "linear_policy_loss", f, (x.linear.hidden, x.linear.weight, x.linear.bias)

    return make


CASES = {
    "linear_logprobs": _linear_logprobs,
    "linear_kl-fused": _linear_kl("fused"),
    "linear_kl-dense": _linear_kl("dense"),
    "linear_kl-topk": _linear_kl("topk"),
    "linear_kl-fused-mean": _linear_kl("fused", "mean"),  # gradients in the forward
    "policy_loss": _policy_loss,
    "linear_policy_loss-ppo": _linear_policy_loss("ppo"),
    "linear_policy_loss-gspo": _linear_policy_loss("gspo"),
}


def _needs(backend, case):
    op = "linear_logprobs" if case == "linear_kl-topk" else case.split("-")[0]
    if backend not in erpd.available("cpu", op):
        pytest.skip(f"backend {backend!r} does not run {op} here")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("how", ["autograd.grad", "backward"])
def test_fused_backends_refuse_a_double_backward(cpu_backend, case, how):
    _needs(cpu_backend, case)
    op, f, leaves = CASES[case](cpu_backend)
    with pytest.raises(RuntimeError, match=rf"erpd\.{op}: double backward .* is not supported on the fused backends"):
        if how == "autograd.grad":
            # torch's own once_differentiable would return gradients with no graph here (the
            # incoming gradient, a constant 1, does not require grad).
            torch.autograd.grad(f(*leaves), leaves, create_graph=True)
        else:
            f(*leaves).backward(create_graph=True)
    # The first-order gradient is unaffected.
    grads = torch.autograd.grad(f(*leaves), leaves)
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().max() > 0 for g in grads)


@pytest.mark.parametrize("case", CASES)
def test_torch_backend_is_twice_differentiable(case):
    """The reference keeps the whole graph: second derivatives match finite differences (float64)."""
    _, f, leaves = CASES[case]("torch", torch.float64)
    assert torch.autograd.gradgradcheck(f, leaves)
