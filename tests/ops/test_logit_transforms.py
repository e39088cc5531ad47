"""Logit scale and softcapping (Gemma, Cohere, Granite...), the per-token statistics of TRL's fused
LM head (erpd.linear_token_stats), and mixed precision (an fp32 head with 16-bit hidden states,
torch.autocast): every CPU backend against the float64 reference, forward and backward.

Tolerance rule (DESIGN.md §5): error vs float64 at most 2x the error of plain PyTorch (the
reference run in the inputs' precision) on the same inputs.
"""

import pytest
import torch

import erpd
from erpd.testing import assert_within_rule, make_linear_inputs, make_linear_policy_inputs

TRANSFORMS = [
    dict(softcap=None, logit_scale=0.4),  # Granite-like: divides the logits
    dict(softcap=4.0, logit_scale=1.0),  # Gemma: logits of std ~3 are well inside and beyond the cap
    dict(softcap=2.5, logit_scale=1.7),
]
_ids = lambda d: "-".join(f"{k}={v}" for k, v in d.items())  # noqa: E731


def _logprobs_run(x, backend, g, **kw):
    """(logprobs, entropy, grads) of one backend on fresh leaves; `backend="naive"` is the
    reference in the inputs' precision (plain PyTorch, the rule's baseline)."""
    fn = erpd.reference.linear_logprobs if backend == "naive" else erpd.linear_logprobs
    extra = {} if backend == "naive" else dict(backend=backend)
    lp, ent = fn(x.hidden, x.weight, x.targets, bias=x.bias, with_entropy=True, **kw, **extra)
    ((lp * g[0].to(lp.dtype)).sum() + (ent * g[1].to(ent.dtype)).sum()).backward()
    grads = {k: getattr(x, k).grad for k in ("hidden", "weight", "bias") if getattr(x, k) is not None}
    return lp.detach(), ent.detach(), grads


def _check_logprobs(x, backend, **kw):
    gen = torch.Generator().manual_seed(5)
    g = (torch.randn(x.targets.shape, generator=gen, dtype=torch.float64),
         torch.randn(x.targets.shape, generator=gen, dtype=torch.float64))
    ref = _logprobs_run(x.to64(), "naive", g, **kw)
    base = _logprobs_run(x.clone(), "naive", g, **kw)
    got = _logprobs_run(x.clone(), backend, g, **kw)
    for i, name in enumerate(("logprobs", "entropy")):
        assert_within_rule(got[i], ref[i], base[i], name=f"{backend} {name}")
    for k in ref[2]:
        assert_within_rule(got[2][k], ref[2][k], base[2][k], name=f"{backend} d{k}")


@pytest.mark.parametrize("transform", TRANSFORMS, ids=_ids)
def test_linear_logprobs(cpu_backend, transform):
    x = make_linear_inputs(37, 96, 1001, bias=True, ignore_frac=0.2, seed=3)
    _check_logprobs(x, cpu_backend, temperature=0.8, **transform)


def test_softcap_changes_the_result(cpu_backend):
    """The transform is really applied (a softcap far above every logit is the identity)."""
    x = make_linear_inputs(16, 32, 128, seed=4)
    plain, _ = erpd.linear_logprobs(x.hidden, x.weight, x.targets, backend=cpu_backend)
    wide, _ = erpd.linear_logprobs(x.hidden, x.weight, x.targets, softcap=1e4, backend=cpu_backend)
    capped, _ = erpd.linear_logprobs(x.hidden, x.weight, x.targets, softcap=2.0, backend=cpu_backend)
    scaled, _ = erpd.linear_logprobs(x.hidden, x.weight, x.targets, logit_scale=0.5, backend=cpu_backend)
    hot, _ = erpd.linear_logprobs(x.hidden, x.weight, x.targets, temperature=2.0, backend=cpu_backend)
    torch.testing.assert_close(wide, plain, rtol=1e-4, atol=1e-4)
    assert (capped - plain).abs().max() > 0.1
    torch.testing.assert_close(scaled, hot, rtol=1e-5, atol=1e-5)  # a scale is an inverse temperature


def test_module_form():
    x = make_linear_inputs(8, 16, 64, seed=5)
    mod = erpd.nn.LinearLogprobs(softcap=2.0, logit_scale=0.7, with_entropy=True)
    torch.testing.assert_close(mod(x.hidden, x.weight, x.targets),
                               erpd.linear_logprobs(x.hidden, x.weight, x.targets, softcap=2.0, logit_scale=0.7,
                                                    with_entropy=True))


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 4 * 1001])
def test_softcap_chunk_boundaries_of_the_cpp_driver(monkeypatch, chunk_bytes):
    """Softcapping budgets two logits buffers per chunk: one row per chunk and ragged 1-row chunks."""
    if not erpd._ext.has_cpu():
        pytest.skip("erpd._C not built")
    monkeypatch.setenv("ERPD_CHUNK_BYTES", str(chunk_bytes))
    x = make_linear_inputs(37, 96, 1001, bias=True, ignore_frac=0.2, seed=6)
    _check_logprobs(x, "cpu", softcap=3.0, logit_scale=1.2, temperature=0.7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_softcap_half_precision(cpu_backend, dtype):
    x = make_linear_inputs(37, 96, 1001, bias=True, ignore_frac=0.2, dtype=dtype, seed=7)
    _check_logprobs(x, cpu_backend, softcap=3.0)


@pytest.mark.parametrize("method", ["ppo", "gspo"])  # ppo: gradients in the forward; gspo: a second pass
@pytest.mark.parametrize("transform", TRANSFORMS[1:], ids=_ids)
def test_linear_policy_loss(cpu_backend, method, transform):
    x = make_linear_policy_inputs(b=3, t=13, h=32, v=101, seed=9, bias=True, ref=True, ignore_frac=0.1)

    def run(y, backend):
        lin = y.linear
        loss, metrics = erpd.linear_policy_loss(
            lin.hidden, lin.weight, lin.targets, y.old_logprobs, y.advantages, y.mask, bias=lin.bias,
            ref_logprobs=y.ref_logprobs, method=method, kl_coef=0.1, entropy_coef=0.02, temperature=0.9,
            backend=backend, **transform,
        )
        wrt = (lin.hidden, lin.weight, lin.bias)
        return loss.detach(), metrics, torch.autograd.grad(loss, wrt)

    ref, base, got = run(x.to64(), "torch"), run(x.clone(), "torch"), run(x.clone(), cpu_backend)
    assert_within_rule(got[0], ref[0], base[0], name="loss")
    for k in ref[1]:
        assert_within_rule(got[1][k], ref[1][k], base[1][k], name=f"metric {k}")
    for name, a, r, b in zip(("hidden", "weight", "bias"), got[2], ref[2], base[2]):
        assert_within_rule(a, r, b, name=f"d{name}")


def test_bad_transform_arguments():
    x = make_linear_inputs(4, 8, 16, seed=1)
    for kw, err, text in ((dict(logit_scale=0.0), ValueError, "logit_scale must be finite and > 0"),
                          (dict(logit_scale=-1.0), ValueError, "logit_scale must be finite and > 0"),
                          (dict(softcap=0.0), ValueError, "softcap must be None or finite and > 0"),
                          (dict(softcap="30"), TypeError, "softcap must be None or a real number")):
        with pytest.raises(err, match=text):
            erpd.linear_logprobs(x.hidden, x.weight, x.targets, **kw)
    with pytest.raises(NotImplementedError, match="softcap with tp_group"):
        erpd.linear_logprobs(x.hidden, x.weight, x.targets, softcap=30.0, tp_group=object())


# --------------------------------------------------------------------------------------------
# linear_token_stats
# --------------------------------------------------------------------------------------------


def _stats_inputs(seed):
    """Integer-valued hidden states and head, so that every backend computes the same exact logits
    (ties included); half the targets are each row's argmax, and rows 0-3 hold ties."""
    g = torch.Generator().manual_seed(seed)
    n, h, v = 40, 24, 301
    hidden = torch.randint(-2, 3, (n, h), generator=g).float()
    weight = torch.randint(-1, 2, (v, h), generator=g).float() * 0.25
    weight[7] = weight[250] = 0.5  # tokens 7 and 250 always tie, and lead on rows 0-3:
    hidden[:4] = 0.5  # their logit 6 beats every other (<= 0.25 * 0.5 * 24 = 3), even softcapped
    bias = None
    targets = torch.randint(0, v, (n,), generator=g)
    logits = hidden @ weight.T
    targets[4::2] = logits[4::2].argmax(-1)
    targets[0], targets[1], targets[2] = 7, 250, -100  # first maximum: top-1; the later tie: not
    return hidden.requires_grad_(), weight.requires_grad_(), bias, targets


@pytest.mark.parametrize("transform", [dict(softcap=None, logit_scale=1.0), *TRANSFORMS], ids=_ids)
def test_token_stats(cpu_backend, transform):
    hidden, weight, bias, targets = _stats_inputs(11)
    kw = dict(temperature=0.7, **transform)
    got = erpd.linear_token_stats(hidden, weight, targets, backend=cpu_backend, **kw)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = erpd.reference.linear_token_stats(h64, w64, targets, **kw)
    base = erpd.reference.linear_token_stats(hidden.detach(), weight.detach(), targets, **kw)
    assert got.is_top1.dtype == torch.bool
    assert torch.equal(got.is_top1, ref["is_top1"])
    assert 10 < int(ref["is_top1"].sum()) < 30  # the check has both answers to get right
    assert got.is_top1[0] and not got.is_top1[1] and not got.is_top1[2]
    for name in ("logprobs", "entropy", "log_sum_sq_probs", "mean_logits"):
        out = getattr(got, name)
        assert out.dtype == torch.float32 and out.shape == (40,)
        assert_within_rule(out, ref[name], base[name], name=name)
    assert not got.log_sum_sq_probs.requires_grad and not got.mean_logits.requires_grad
    # logprobs and entropy are differentiable, as in linear_logprobs
    g = torch.randn(40, dtype=torch.float64)
    (got.logprobs * g.float()).sum().add(got.entropy.sum()).backward()
    (ref["logprobs"] * g).sum().add(ref["entropy"].sum()).backward()
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


def test_token_stats_leading_dims_and_empty(cpu_backend):
    x = make_linear_inputs((3, 5), 16, 64, ignore_frac=0.3, seed=13)
    s = erpd.linear_token_stats(x.hidden, x.weight, x.targets, backend=cpu_backend)
    assert all(t.shape == (3, 5) for t in s)
    ignored = x.targets == -100
    assert (s.mean_logits[ignored] == 0).all() and not s.is_top1[ignored].any()
    e = make_linear_inputs(0, 16, 64, seed=13)
    s = erpd.linear_token_stats(e.hidden, e.weight, e.targets, backend=cpu_backend)
    assert all(t.shape == (0,) for t in s)


# --------------------------------------------------------------------------------------------
# mixed precision
# --------------------------------------------------------------------------------------------

HALF = [torch.bfloat16, torch.float16]


@pytest.fixture(params=["torch", *[b for b in erpd.available("cpu") if b != "torch"]])
def backend_or_torch(request):
    return request.param


def _ops(backend):
    """Each op as a function of (hidden, weight, bias, targets) returning (tensor to compare, loss)."""
    t = make_linear_inputs(6, 24, 97, seed=17, requires_grad=False)

    def logprobs(h, w, b, y):
        lp, ent = erpd.linear_logprobs(h, w, y, bias=b, with_entropy=True, backend=backend)
        return torch.stack([lp, ent]), lp.sum() + ent.sum()

    def stats(h, w, b, y):
        s = erpd.linear_token_stats(h, w, y, bias=b, softcap=2.0, backend=backend)
        return torch.stack([s.logprobs, s.log_sum_sq_probs, s.mean_logits]), s.logprobs.sum()

    def kl(h, w, b, y):
        d = erpd.linear_kl(h, w, y, bias=b, teacher_hidden=t.hidden.to(h.dtype), teacher_weight=t.weight,
                           direction="jsd", beta=0.3, backend=backend)
        return d, d.sum()

    def policy(h, w, b, y):
        loss, m = erpd.linear_policy_loss(h.view(2, 3, -1), w, y.view(2, 3), None, torch.tensor([1.0, -0.5]),
                                          torch.ones(2, 3, dtype=torch.bool), bias=b, backend=backend)
        return torch.stack([loss, m["entropy"]]), loss

    return dict(logprobs=logprobs, stats=stats, kl=kl, policy=policy)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("op", ["logprobs", "stats", "kl", "policy"])
def test_fp32_head_with_half_hidden_is_the_cast_head(backend_or_torch, op, dtype):
    """An fp32 weight (and bias) with 16-bit hidden states gives exactly what the head cast to
    the hidden dtype gives, as autocast computes F.linear; the head's gradients come back in fp32,
    equal to the cast head's gradients cast up."""
    fn = _ops(backend_or_torch)[op]
    x = make_linear_inputs(6, 24, 97, bias=True, seed=19)
    h = x.hidden.detach().to(dtype).requires_grad_()
    w, b = x.weight.detach().requires_grad_(), x.bias.detach().requires_grad_()
    out, loss = fn(h, w, b, x.targets)
    loss.backward()
    h2 = h.detach().clone().requires_grad_()
    w2, b2 = w.detach().to(dtype).requires_grad_(), b.detach().to(dtype).requires_grad_()
    out2, loss2 = fn(h2, w2, b2, x.targets)
    loss2.backward()
    assert torch.equal(out, out2)
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32 and h.grad.dtype == dtype
    assert torch.equal(w.grad, w2.grad.float()) and torch.equal(b.grad, b2.grad.float())
    assert torch.equal(h.grad, h2.grad)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("op", ["logprobs", "kl", "policy"])
def test_under_autocast_everything_runs_in_the_autocast_dtype(backend_or_torch, op, dtype):
    fn = _ops(backend_or_torch)[op]
    x = make_linear_inputs(6, 24, 97, bias=True, seed=23)
    with torch.autocast("cpu", dtype=dtype):
        out, loss = fn(x.hidden, x.weight, x.bias, x.targets)
    loss.backward()
    y = x.clone()
    out2, loss2 = fn(y.hidden.to(dtype), y.weight.to(dtype), y.bias.to(dtype), y.targets)
    loss2.backward()
    torch.testing.assert_close(out, out2, rtol=0, atol=0)
    for k in ("hidden", "weight", "bias"):
        assert getattr(x, k).grad.dtype == torch.float32
        torch.testing.assert_close(getattr(x, k).grad, getattr(y, k).grad, rtol=0, atol=0)


def test_other_dtype_mixes_are_refused():
    x = make_linear_inputs(4, 8, 16, seed=29)
    with pytest.raises(TypeError, match=r"weight dtype torch.bfloat16 does not match hidden dtype torch.float32"):
        erpd.linear_logprobs(x.hidden, x.weight.bfloat16(), x.targets)
    with pytest.raises(TypeError, match=r"weight dtype torch.float16 does not match hidden dtype torch.bfloat16"):
        erpd.linear_logprobs(x.hidden.bfloat16(), x.weight.half(), x.targets)
