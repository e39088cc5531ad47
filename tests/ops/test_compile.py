"""torch.compile(fullgraph=True) traces through every op, and the registered ops are sound.

* `test_opcheck_*`: `torch.library.opcheck` on every registered op (the erpd:: C++ ops and the
  erpd_triton:: custom ops of erpd/ops/_library.py): schema, autograd registration, fake tensor
  vs real kernel (shapes, dtypes, strides), and AOT dispatch with dynamic shapes. Inputs never
  require grad there: none of these ops has an autograd formula of its own (autograd lives in the
  ops' `torch.autograd.Function`s, whose backward calls the `*_bwd` ops), so the autograd
  registration check only confirms that they are not silently treated as differentiable.
* `test_compiled_equals_eager`: each public op under `torch.compile(fullgraph=True)` (which fails
  on any graph break) gives the eager values and gradients, on every CPU backend, with ignored
  rows in the batch, whose loss and gradient must be exactly 0 (a fused loss elsewhere returned
  garbage there under compile).

Runtime: compiling costs several seconds per graph on this 2-core CPU (10-30 s with Inductor,
which generates and builds C++), so the tests are few and tiny and use the ``aot_eager``
backend, which runs dynamo, the fake-tensor tracing and AOTAutograd (everything a registration
error would break) but not Inductor's code generation; one test runs Inductor end to end. The
whole file takes about 1.5-2 minutes here. `test_no_host_sync_on_cuda` needs a GPU.
"""

import pytest
import torch
from torch.library import opcheck

import erpd
from erpd.ops import _library
from erpd.testing import make_kl_teacher, make_linear_inputs
from erpd.testing.shapes import by_name

SHAPE = by_name("tiny")  # N=16, H=32, V=128
B, T = 2, SHAPE.n // 2
IGNORE = -100
CPU_BACKENDS = [b for b in erpd.available("cpu") if b != "torch"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Each test's closures share code objects with the previous parametrization's; without a
    # reset dynamo would recompile against its cache and eventually hit the recompile limit.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------------------------


def _lin(n=5, h=8, v=11, bias=True, seed=0):
    x = make_linear_inputs(n, h, v, bias=bias, seed=seed, requires_grad=False, ignore_frac=0.3)
    return x.hidden, x.weight, x.bias, x.targets


def _samples_linear_logprobs(op_fwd):
    out = {}
    for bias in (True, False):
        h, w, b, t = _lin(bias=bias)
        out[f"fwd-bias{bias}"] = ("linear_logprobs_fwd", (h, w, b, t, 0.7, 0.0, IGNORE, False))
        # softcapped, with the statistics
        out[f"fwd-bias{bias}-softcap-stats"] = ("linear_logprobs_fwd", (h, w, b, t, 0.7, 0.3, IGNORE, True))
        logp, ent, lse, _ = op_fwd(h, w, b, t, 0.7, 0.0, IGNORE, False)
        g = torch.randn_like(lse)
        for need_h, need_w, g_ent in ((True, True, torch.randn_like(lse)), (True, False, None), (False, True, None)):
            out[f"bwd-bias{bias}-h{need_h}-w{need_w}"] = (
                "linear_logprobs_bwd", (h, w, b, t, lse, ent, g, g_ent, 0.7, 0.0, IGNORE, need_h, need_w))
        out[f"bwd-bias{bias}-softcap"] = (
            "linear_logprobs_bwd", (h, w, b, t, lse, ent, g, None, 0.7, 0.3, IGNORE, True, True))
    return out


def _samples_linear_kl(op_fwd):
    out = {}
    h, w, b, t = _lin()
    th, tw = torch.randn(5, 6), torch.randn(11, 6) * 0.3
    tl = torch.randn(5, 11)
    for label, teacher in (("fused", (th, tw, torch.randn(11), None)), ("dense", (None, None, None, tl))):
        for mode, beta in ((0, 0.5), (2, 0.3)):
            fwd_args = (h, w, b, *teacher, t, 1.3, IGNORE, mode, beta)
            out[f"fwd-{label}-mode{mode}"] = ("linear_kl_fwd", fwd_args)
            kl, lse_s, lse_t, aux = op_fwd(*fwd_args)
            out[f"bwd-{label}-mode{mode}"] = (
                "linear_kl_bwd", (h, w, b, *teacher, t, lse_s, lse_t, aux, torch.randn_like(kl), 1.3, IGNORE, mode,
                                  beta, True, mode == 0))
    return out


def _samples_linear_kl_fwd_with_grads():
    h, w, b, t = _lin()
    th, tw = torch.randn(5, 6), torch.randn(11, 6) * 0.3
    g = torch.rand(5)
    return {
        "fused-jsd": ("linear_kl_fwd_with_grads", (h, w, b, th, tw, None, None, t, g, 1.3, IGNORE, 2, 0.3, True, True)),
        "dense-forward-w": ("linear_kl_fwd_with_grads",
                            (h, w, None, None, None, None, torch.randn(5, 11), t, g, 0.8, IGNORE, 0, 0.5, False, True)),
    }


def _policy_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g) * 3
    old = lp + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    return lp, old, adv, mask


def _samples_policy_loss():
    lp, old, adv, mask = _policy_batch()
    ent = torch.rand(B, T) * 2
    ref = lp - 0.1
    # method, agg, ratio_lo, ratio_hi, dual_clip, tau_pos, tau_neg, kl_coef, kl_estimator, entropy_coef,
    # num_items_value, norm_scale, kl_ratio_weighted, need_grad_entropy
    ppo = (0, 0, 0.8, 1.2, 3.0, 1.0, 1.05, 0.1, 2, 0.01, 0.0, 1.0, True, True)
    gspo = (3, 1, 0.8, 1.2, 0.0, 1.0, 1.05, 0.0, 2, 0.0, 0.0, 1.0, False, False)
    return {
        "ppo": ("policy_loss_fwd", (lp, old, adv, mask, ref, ent, None, None, *ppo)),
        "gspo-num_items": ("policy_loss_fwd", (lp, old, adv.unsqueeze(1).expand(B, T).contiguous(), mask, None, None,
                                               torch.rand(B, T), torch.tensor(5.0), *gspo)),
    }


def _samples_linear_policy_loss():
    h, w, b, t = _lin(n=B * T, v=13)
    _, old, adv, mask = _policy_batch()
    scal = (0, 0, 0.8, 1.2, 0.0, 1.0, 1.05, 0.0, 2, 0.01, 0.0, 1.0, False)
    out = {}
    for need_h, need_w in ((True, True), (False, True)):
        out[f"ppo-h{need_h}-w{need_w}"] = (
            "linear_policy_loss_fwd",
            (h, w, b, t, 0.9, 0.0, IGNORE, old, adv, mask, None, None, None, *scal, need_h, need_w))
    gspo = (3, 1, 0.8, 1.2, 0.0, 1.0, 1.05, 0.0, 2, 0.0, 0.0, 1.0, False)
    out["gspo-on-policy-softcap"] = (
        "linear_policy_loss_fwd",
        (h, w, None, t, 1.0, 0.2, IGNORE, None, adv, mask, None, None, None, *gspo, True, True))
    return out


def _all_samples(backend):
    ns = torch.ops.erpd_triton if backend == "triton" else torch.ops.erpd
    out = {}
    out.update(_samples_linear_logprobs(ns.linear_logprobs_fwd))
    out.update(_samples_linear_kl(ns.linear_kl_fwd))
    out.update(_samples_policy_loss())
    if backend == "cpu":
        out.update(_samples_linear_policy_loss())
        out.update(_samples_linear_kl_fwd_with_grads())
    return out


def _opcheck_cases():
    cases = []
    for backend in CPU_BACKENDS:
        names = _library.TRITON_OPS if backend == "triton" else _library.CPP_OPS
        cases += [pytest.param(backend, n, id=f"{backend}-{n}") for n in names]
    return cases


@pytest.mark.parametrize("backend, op_name", _opcheck_cases())
def test_opcheck(backend, op_name):
    ns = torch.ops.erpd_triton if backend == "triton" else torch.ops.erpd
    samples = {k: args for k, (name, args) in _all_samples(backend).items() if name == op_name}
    assert samples, op_name
    for label, args in samples.items():
        result = opcheck(getattr(ns, op_name), args, raise_exception=False)
        failed = {k: v for k, v in result.items() if v != "SUCCESS"}
        assert not failed, f"{op_name} [{label}]: {failed}"


def test_every_cpp_op_has_a_fake():
    # A new C++ op without a fake would make torch.compile fail only when someone compiles it.
    schemas = {s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("erpd::")}
    assert schemas == set(_library.CPP_OPS)
    for name in _library.CPP_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"erpd::{name}", "Meta"), name


# --------------------------------------------------------------------------------------------
# compiled == eager
# --------------------------------------------------------------------------------------------


def _linear(seed=0):
    x = make_linear_inputs(SHAPE.n, SHAPE.h, SHAPE.v, bias=True, seed=seed, ignore_frac=0.25)
    assert (x.targets == IGNORE).any() and (x.targets != IGNORE).any()
    return x


def _case_linear_logprobs(backend):
    x = _linear()

    def f(h, w, b):
        lp, ent = erpd.linear_logprobs(h, w, x.targets, bias=b, temperature=0.7, with_entropy=True, backend=backend)
        return lp * 1.5 + ent

    return x, f


def _case_linear_kl(backend):
    x = _linear(1)
    teacher = make_kl_teacher(x, "fused", h=24, seed=2)

    def f(h, w, b):
        return erpd.linear_kl(h, w, x.targets, bias=b, direction="jsd", beta=0.3, backend=backend, **teacher)

    return x, f


def _case_linear_kl_loss(backend):
    x = _linear(4)
    teacher = make_kl_teacher(x, "fused", h=24, seed=5)

    def f(h, w, b):
        return erpd.linear_kl(h, w, x.targets, bias=b, direction="reverse", reduction="mean", num_items=11,
                              backend=backend, **teacher)

    return x, f


def _case_policy_loss(backend):
    x = _linear(2)
    _, old, adv, mask = _policy_batch(2)

    def f(h, w, b):
        # The log-probs come from the reference op, so that only policy_loss's backend is under test.
        lp, ent = erpd.linear_logprobs(h, w, x.targets, bias=b, with_entropy=True, backend="torch")
        valid = mask & (x.targets.view(B, T) != IGNORE)
        loss, m = erpd.policy_loss(lp.view(B, T), old, adv, valid, entropy=ent.view(B, T), entropy_coef=0.01,
                                   backend=backend)
        return torch.stack([loss, m["clipfrac"], m["ratio_max"]])

    return x, f


def _case_linear_policy_loss(backend):
    x = _linear(3)
    _, old, adv, mask = _policy_batch(3)

    def f(h, w, b):
        loss, m = erpd.linear_policy_loss(h.view(B, T, -1), w, x.targets.view(B, T), old, adv, mask, bias=b,
                                          temperature=0.8, entropy_coef=0.01, backend=backend)
        return torch.stack([loss, m["entropy"], m["approx_kl"]])

    return x, f


CASES = {
    "linear_logprobs": _case_linear_logprobs,
    "linear_kl": _case_linear_kl,
    "linear_kl_loss": _case_linear_kl_loss,
    "policy_loss": _case_policy_loss,
    "linear_policy_loss": _case_linear_policy_loss,
}


def _run(f, x, upstream):
    c = x.clone()
    out = f(c.hidden, c.weight, c.bias)
    out.backward(upstream)
    return out.detach(), c.hidden.grad, c.weight.grad, c.bias.grad


@pytest.mark.parametrize("backend", ["torch", *CPU_BACKENDS])
@pytest.mark.parametrize("op", list(CASES))
def test_compiled_equals_eager(op, backend):
    x, f = CASES[op](backend)
    shape = f(x.hidden, x.weight, x.bias).shape
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    eager = _run(f, x, upstream)
    compiled = _run(torch.compile(f, fullgraph=True, backend="aot_eager"), x, upstream)
    for name, e, c in zip(("out", "grad_hidden", "grad_weight", "grad_bias"), eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6, msg=lambda m: f"{op}/{backend} {name}: {m}")
    ignored = x.targets == IGNORE
    assert compiled[1][ignored].abs().max() == 0, "ignored rows got a gradient under compile"
    if op in ("linear_logprobs", "linear_kl"):
        assert (compiled[0][ignored] == 0).all(), "ignored rows got a nonzero loss under compile"


def test_all_rows_ignored_under_compile():
    """An all-ignored batch under compile: zero loss, zero gradients (no NaN from 0/0)."""
    x = make_linear_inputs(SHAPE.n, SHAPE.h, SHAPE.v, seed=4)
    targets = torch.full_like(x.targets, IGNORE)
    backend = CPU_BACKENDS[0]

    def f(h, w):
        lp, ent = erpd.linear_logprobs(h, w, targets, with_entropy=True, backend=backend)
        kl = erpd.linear_kl(h, w, targets, teacher_logits=torch.ones(SHAPE.n, SHAPE.v), backend=backend)
        loss, _ = erpd.linear_policy_loss(h.view(B, T, -1), w, targets.view(B, T), None, torch.ones(B),
                                          torch.ones(B, T, dtype=torch.bool), backend=backend)
        return lp.sum() + ent.sum() + kl.sum() + loss

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x.hidden, x.weight)
    out.backward()
    assert out.item() == 0
    assert x.hidden.grad.abs().max() == 0 and x.weight.grad.abs().max() == 0


@pytest.mark.slow  # an Inductor compile of the whole graph
def test_inductor_end_to_end():
    """One op through Inductor (its generated C++ around the opaque erpd ops)."""
    x, f = _case_linear_policy_loss(CPU_BACKENDS[0])
    upstream = torch.randn(3)
    eager = _run(f, x, upstream)
    compiled = _run(torch.compile(f, fullgraph=True), x, upstream)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# host syncs
# --------------------------------------------------------------------------------------------
# On CPU, "no host sync" holds by construction where it matters: any host read of a tensor
# value in an op (.item(), bool(tensor)) is a data-dependent branch, which fails the
# fullgraph=True compiles above. On CUDA the dispatcher can also say so directly:


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_no_host_sync_on_cuda(backend):
    """Forward and backward of every op with validate=False (the CUDA default) under
    torch.cuda.set_sync_debug_mode("error"). (Written without a GPU at hand: not yet run.)"""
    dev = "cuda"
    if backend not in erpd.available(dev, op="linear_policy_loss"):
        pytest.skip(f"backend {backend!r} not available on CUDA here")
    x = make_linear_inputs(SHAPE.n, SHAPE.h, SHAPE.v, bias=True, seed=9, ignore_frac=0.25, device=dev)
    teacher = make_kl_teacher(x, "fused", h=24, seed=2)
    _, old, adv, mask = (t.to(dev) for t in _policy_batch(9))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        lp, ent = erpd.linear_logprobs(x.hidden, x.weight, x.targets, bias=x.bias, with_entropy=True,
                                       backend=backend, validate=False)
        kl = erpd.linear_kl(x.hidden, x.weight, x.targets, bias=x.bias, backend=backend, validate=False, **teacher)
        pl, _ = erpd.policy_loss(lp.view(B, T), old, adv, mask, entropy=ent.view(B, T), entropy_coef=0.01,
                                 backend=backend, validate=False)
        lpl, _ = erpd.linear_policy_loss(x.hidden.view(B, T, -1), x.weight, x.targets.view(B, T), old, adv, mask,
                                         bias=x.bias, backend=backend, validate=False)
        (lp.sum() + kl.sum() + pl + lpl).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(x.hidden.grad).all()
