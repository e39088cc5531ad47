"""policy_loss: every method x aggregation, every backend, against the float64 reference.

Tolerance rule (DESIGN.md §5): error vs float64 at most 2x the error plain PyTorch (the reference
run in float32, i.e. backend="torch") makes on the same inputs, plus a small floor. The
reference itself is pinned to hand-computed values at the end of the file.
"""

import math

import pytest
import torch

import erpd
from erpd.reference import POLICY_AGGS, POLICY_METHODS
from erpd.testing import assert_within_rule, make_linear_policy_inputs, make_policy_inputs


def _run(x, backend, **opts):
    """Loss, metrics and the gradients w.r.t. logprobs (and entropy) of one backend, on fresh leaves."""
    loss, metrics = erpd.policy_loss(
        x.logprobs, x.old_logprobs, x.advantages, x.mask, backend=backend, **x.kwargs(), **opts
    )
    wrt = [x.logprobs] + ([x.entropy] if x.entropy is not None and opts.get("entropy_coef", 0.0) else [])
    # grad_output != 1, so that the backward's scale is exercised.
    grads = torch.autograd.grad(loss * 1.7, wrt)
    return loss.detach(), metrics, grads


def _check_micro_batches(x, backend, num_items, **opts):
    """Uneven micro-batches of `x`, each given the step's `num_items`, add up to the one-batch loss
    and gradients. Returns the first micro-batch's loss."""
    full_loss, _, full_grads = _run(x, backend, **opts)
    losses, grads = [], [[], []]
    for sl in (slice(0, 1), slice(1, 4), slice(4, 6)):
        loss, _, g = _run(x.rows(sl), backend, num_items=num_items, **opts)
        losses.append(loss)
        for i, gi in enumerate(g):
            grads[i].append(gi)
    torch.testing.assert_close(sum(losses), full_loss, rtol=1e-5, atol=1e-6)
    for i, full in enumerate(full_grads):
        torch.testing.assert_close(torch.cat(grads[i]), full, rtol=1e-5, atol=1e-7)
    return losses[0]


def check_backend(x, backend, dtype=torch.float32, **opts):
    """`dtype`: the precision of the differentiable inputs; the float64 reference sees the same
    (rounded) values, and plain PyTorch (the rule's baseline) runs on them in `dtype`."""
    x = x.cast(dtype)
    ref = _run(x.cast(torch.float64), "torch", **opts)
    base = _run(x.cast(dtype), "torch", **opts)
    got = _run(x.cast(dtype), backend, **opts)
    assert got[0].dtype == torch.float32 and got[0].shape == ()
    assert_within_rule(got[0], ref[0], base[0], name=f"{backend} loss")
    assert set(got[1]) == set(ref[1]), f"{backend} metric names {sorted(got[1])} != {sorted(ref[1])}"
    for k in ref[1]:
        assert got[1][k].shape == () and not got[1][k].requires_grad
        assert_within_rule(got[1][k], ref[1][k], base[1][k], name=f"{backend} metric {k}")
    for i, (g, r, b) in enumerate(zip(got[2], ref[2], base[2])):
        assert torch.isfinite(g).all(), f"{backend} grad {i} has non-finite entries (padding leaked?)"
        assert_within_rule(g, r, b, name=f"{backend} grad {i}")
    # Padding gets exactly zero gradient.
    assert (got[2][0][x.mask == 0] == 0).all()
    return got


@pytest.fixture(params=["torch", *[b for b in erpd.available("cpu") if b != "torch"]])
def backend(request):
    return request.param


@pytest.mark.parametrize("agg", POLICY_AGGS)
@pytest.mark.parametrize("method", POLICY_METHODS)
def test_methods_and_aggregations(cpu_backend, method, agg):
    x = make_policy_inputs(5, 37, seed=POLICY_METHODS.index(method) * 7 + POLICY_AGGS.index(agg), ref=True, entropy=True)
    check_backend(x, cpu_backend, method=method, agg=agg, kl_coef=0.05, entropy_coef=0.01)


@pytest.mark.parametrize(
    "opts",
    [
        dict(method="ppo", clip_low=0.2, clip_high=0.28),  # clip-higher (DAPO)
        dict(method="ppo", dual_clip=1.5, clip_low=0.1),
        dict(method="gspo", clip_low=0.05, clip_high=0.08, dual_clip=1.3),
        dict(method="sapo", tau_pos=0.5, tau_neg=2.0),
        dict(method="cispo", cispo_cap=1.2),  # one-sided, binding
        dict(method="cispo", cispo_floor=0.9, cispo_cap=1.1),  # verl's two-sided form
        dict(method="reinforce", reinforce_cap=1.1),
        dict(method="reinforce"),
    ],
    ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()),
)
def test_method_options_with_per_token_advantages_and_is_weights(cpu_backend, opts):
    x = make_policy_inputs(4, 45, seed=3, drift=0.5, per_token_advantages=True, is_weights=True)
    check_backend(x, cpu_backend, agg="seq-mean-token-mean", **opts)


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
def test_kl_estimators(cpu_backend, kl_estimator):
    x = make_policy_inputs(4, 33, seed=11, ref=True, drift=1.0)
    check_backend(x, cpu_backend, kl_coef=0.3, kl_estimator=kl_estimator)


@pytest.mark.parametrize("method", POLICY_METHODS)
def test_kl_ratio_weighted(cpu_backend, method):
    """The importance-weighted KL term (TRL's use_bias_correction_kl): r k, whose gradient carries
    r's own derivative (through gspo's sequence ratio for gspo); the kl_ref metric is its mean."""
    x = make_policy_inputs(5, 29, seed=19, ref=True, drift=0.6, is_weights=True)
    _, weighted, _ = check_backend(x, cpu_backend, method=method, agg="seq-mean-token-mean", kl_coef=0.3,
                                   kl_estimator="k3", kl_ratio_weighted=True)
    _, plain, _ = _run(x, cpu_backend, method=method, kl_coef=0.3, kl_estimator="k3")
    assert abs(weighted["kl_ref"] - plain["kl_ref"]) > 1e-3


def test_kl_ratio_weighted_needs_ref():
    x = make_policy_inputs(2, 5, seed=1)
    with pytest.raises(ValueError, match="kl_ratio_weighted=True weights the KL term, which needs ref_logprobs"):
        erpd.policy_loss(x.logprobs, x.old_logprobs, x.advantages, x.mask, kl_ratio_weighted=True)


def test_metrics_only_kl_and_entropy(cpu_backend):
    """ref_logprobs / entropy without coefficients: metrics only, no gradient into entropy."""
    x = make_policy_inputs(4, 33, seed=13, ref=True, entropy=True)
    loss, metrics, grads = check_backend(x, cpu_backend)
    assert {"kl_ref", "entropy"} <= set(metrics) and len(grads) == 1
    loss0, _ = erpd.policy_loss(x.logprobs, x.old_logprobs, x.advantages, x.mask, backend=cpu_backend)
    torch.testing.assert_close(loss, loss0.detach())


def test_extreme_log_ratios_are_clamped(cpu_backend):
    """|log r| > 20 at valid tokens: finite loss, zero ratio gradient there (the documented clamp)."""
    x = make_policy_inputs(3, 16, seed=17, ref=True)
    x.old_logprobs[0, :3] = x.logprobs[0, :3].detach() - 30.0
    x.old_logprobs[2, :2] = x.logprobs[2, :2].detach() + 30.0
    for method in ("ppo", "sapo", "gspo"):
        check_backend(x, cpu_backend, method=method, kl_coef=0.1)


@pytest.mark.parametrize("agg", POLICY_AGGS)
def test_micro_batches_with_num_items_sum_to_the_full_batch(backend, agg):
    """Gradient accumulation: micro-batch losses with the step's num_items add up to the one-batch loss."""
    x = make_policy_inputs(6, 29, seed=19, ref=True, entropy=True).cast(torch.float32)
    opts = dict(method="ppo", agg=agg, kl_coef=0.1, entropy_coef=0.02)
    count = int(x.mask.sum()) if agg == "token-mean" else x.mask.shape[0]
    first = _check_micro_batches(x, backend, count, **opts)
    # Without num_items, token-mean micro-batches would not add up (the bug TRL and verl fixed).
    if agg == "token-mean":
        loss_local, _, _ = _run(x.rows(slice(0, 1)), backend, **opts)
        assert not torch.allclose(loss_local, first)


def test_num_items_tensor_equals_number(cpu_backend):
    x = make_policy_inputs(4, 20, seed=23)
    a, ma = erpd.policy_loss(x.logprobs, x.old_logprobs, x.advantages, x.mask, num_items=123, backend=cpu_backend)
    b, mb = erpd.policy_loss(x.logprobs, x.old_logprobs, x.advantages, x.mask, num_items=torch.tensor(123), backend=cpu_backend)
    torch.testing.assert_close(a, b)
    ga, = torch.autograd.grad(a, x.logprobs)
    gb, = torch.autograd.grad(b, x.logprobs)
    torch.testing.assert_close(ga, gb)


UNCHECKED_NUM_ITEMS = [0.0, -3.0, 0.5, float("nan"), float("inf"), -float("inf")]


def _check_unchecked_num_items(backend, value, agg, device="cpu"):
    """Where no value check runs (validate=False; on CUDA also the default), a tensor num_items
    below 1 counts as 1 and a NaN or infinite one makes the loss and gradients NaN, on every
    backend, for policy_loss and linear_policy_loss (the cpu backend used to fall back to the
    batch's own count there, triton and torch to clamp to 1)."""
    x = make_policy_inputs(3, 7, seed=31, device=device)
    lx = make_linear_policy_inputs(3, 7, 8, 13, seed=31, device=device)
    lin = lx.linear

    def run(num_items):
        loss, _ = erpd.policy_loss(x.logprobs, x.old_logprobs, x.advantages, x.mask, agg=agg, num_items=num_items,
                                   backend=backend, validate=False)
        (g,) = torch.autograd.grad(loss, x.logprobs)
        fused, _ = erpd.linear_policy_loss(lin.hidden, lin.weight, lin.targets, lx.old_logprobs, lx.advantages, lx.mask,
                                           agg=agg, num_items=num_items, backend=backend, validate=False)
        (gh,) = torch.autograd.grad(fused, lin.hidden)
        return loss, g[x.mask], fused, gh[lx.mask]

    got = run(torch.tensor(value, device=device))
    if math.isfinite(value):
        for a, b in zip(got, run(1.0)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    else:  # (a clipped token's gradient may stay 0: its derivative is 0, not 0 * NaN)
        loss, g, fused, gh = got
        assert torch.isnan(loss) and torch.isnan(fused) and torch.isnan(g).any() and torch.isnan(gh).any()


@pytest.mark.parametrize("value", UNCHECKED_NUM_ITEMS, ids=str)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_unchecked_num_items_tensor_has_one_meaning(backend, value, agg):
    _check_unchecked_num_items(backend, value, agg)


def test_num_items_is_checked_like_a_number(cpu_backend):
    """Where the value checks run, a tensor num_items must be finite and > 0, as a number must."""
    x = make_policy_inputs(3, 7, seed=37)
    lx = make_linear_policy_inputs(2, 5, 8, 11, seed=37)
    for value in (0.0, -1.0, float("nan"), float("inf")):
        for num_items, words in ((torch.tensor(value), "num_items must be finite and > 0"),
                                 (value, "num_items must be")):
            with pytest.raises(ValueError, match=words):
                erpd.policy_loss(x.logprobs, x.old_logprobs, x.advantages, x.mask, num_items=num_items, backend=cpu_backend)
            with pytest.raises(ValueError, match=words):
                erpd.linear_policy_loss(lx.linear.hidden, lx.linear.weight, lx.linear.targets, lx.old_logprobs,
                                        lx.advantages, lx.mask, num_items=num_items, backend=cpu_backend)


def test_norm_length(cpu_backend):
    x = make_policy_inputs(4, 20, seed=29)
    check_backend(x, cpu_backend, agg="seq-mean-token-sum-norm", norm_length=64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_logprobs(cpu_backend, dtype):
    x = make_policy_inputs(4, 20, seed=31, entropy=True)
    y = x.cast(dtype)
    loss, metrics = erpd.policy_loss(y.logprobs, y.old_logprobs, y.advantages, y.mask, entropy=y.entropy,
                                     entropy_coef=0.1, backend=cpu_backend)
    g_lp, g_h = torch.autograd.grad(loss, [y.logprobs, y.entropy])
    assert loss.dtype == torch.float32 and g_lp.dtype == dtype and g_h.dtype == dtype
    ref, _ = erpd.policy_loss(y.logprobs.float(), y.old_logprobs, y.advantages, y.mask, entropy=y.entropy.float(),
                              entropy_coef=0.1, backend="torch")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32, torch.bfloat16], ids=str)
def test_mask_dtypes(cpu_backend, mask_dtype):
    x = make_policy_inputs(3, 17, seed=37)
    x.mask = x.mask.to(mask_dtype)
    check_backend(x, cpu_backend, agg="seq-mean-token-mean")


def test_all_masked_and_empty(backend):
    x = make_policy_inputs(3, 8, seed=41)
    x.mask = torch.zeros_like(x.mask)
    loss, metrics = erpd.policy_loss(x.logprobs, x.old_logprobs, x.advantages, x.mask, backend=backend)
    (g,) = torch.autograd.grad(loss, x.logprobs)
    assert loss.item() == 0.0 and (g == 0).all()
    assert metrics["ratio_min"].item() == 1.0 and metrics["ratio_max"].item() == 1.0 and metrics["clipfrac"].item() == 0.0
    e = make_policy_inputs(0, 5, seed=41)
    loss, metrics = erpd.policy_loss(e.logprobs, e.old_logprobs, e.advantages, e.mask, backend=backend)
    (g,) = torch.autograd.grad(loss, e.logprobs)
    assert loss.item() == 0.0 and g.shape == (0, 5)


def test_float64_on_torch_backend():
    x = make_policy_inputs(3, 9, seed=43).cast(torch.float64)
    loss, metrics = erpd.policy_loss(x.logprobs, x.old_logprobs.double(), x.advantages.double(), x.mask, backend="torch")
    assert loss.dtype == torch.float64


def test_metrics_match_their_definitions(cpu_backend):
    """Metrics recomputed here from their documented definitions (not from the reference)."""
    x = make_policy_inputs(4, 40, seed=47, drift=0.6, ref=True, entropy=True)
    _, metrics = erpd.policy_loss(x.logprobs, x.old_logprobs, x.advantages, x.mask, clip_low=0.2, clip_high=0.3,
                                  ref_logprobs=x.ref_logprobs, entropy=x.entropy, backend=cpu_backend)
    v = x.mask
    lp, old = x.logprobs.detach()[v].double(), x.old_logprobs[v].double()
    adv = x.advantages[:, None].expand_as(x.mask)[v].double()
    r = (lp - old).exp()
    expect = {
        "clipfrac_low": ((r < 0.8) & (adv < 0)).double().mean(),
        "clipfrac_high": ((r > 1.3) & (adv > 0)).double().mean(),
        "ratio_mean": r.mean(), "ratio_min": r.min(), "ratio_max": r.max(),
        "approx_kl": (r - 1 - r.log()).mean(),
        "kl_ref": ((x.ref_logprobs[v].double() - lp).exp() - (x.ref_logprobs[v].double() - lp) - 1).mean(),
        "entropy": x.entropy.detach()[v].double().mean(),
    }
    for k, e in expect.items():
        assert abs(metrics[k].item() - e.item()) <= 1e-5 * max(1.0, abs(e.item())), (k, metrics[k].item(), e.item())
    assert metrics["clipfrac_low"] > 0 and metrics["clipfrac_high"] > 0  # the inputs do reach the clip
    torch.testing.assert_close(metrics["clipfrac"], metrics["clipfrac_low"] + metrics["clipfrac_high"])


def test_auto_backend_and_module_form(cpu_backend):
    x = make_policy_inputs(3, 11, seed=53, entropy=True)
    mod = erpd.nn.PolicyLoss(method="sapo", agg="seq-mean-token-mean", entropy_coef=0.01, backend=cpu_backend)
    loss, metrics = mod(x.logprobs, x.old_logprobs, x.advantages, x.mask, entropy=x.entropy)
    ref, _ = erpd.policy_loss(x.logprobs, x.old_logprobs, x.advantages, x.mask, method="sapo", agg="seq-mean-token-mean",
                              entropy=x.entropy, entropy_coef=0.01, backend="torch")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert "method='sapo'" in repr(mod)
    if erpd._ext.has_cpu():
        assert erpd.backends.resolve("auto", torch.device("cpu"), "policy_loss") == "cpu"


# --------------------------------------------------------------------------------------------
# GPU: the triton and cuda backends on CUDA tensors (skipped without a CUDA device).
# --------------------------------------------------------------------------------------------

GPU_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _need_gpu_backend(backend, op="policy_loss"):
    if backend not in erpd.available("cuda", op):
        pytest.skip(f"{backend} not available for {op} on CUDA here")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("agg", GPU_AGGS)
@pytest.mark.parametrize("method", POLICY_METHODS)
def test_gpu_backends(backend, dtype, method, agg):
    """Every method x three aggregations with KL, entropy bonus and IS weights, ~8k tokens (rows
    longer than a 256-thread block, one fully padded row), vs the float64 reference."""
    _need_gpu_backend(backend)
    seed = 100 + POLICY_METHODS.index(method) * 7 + GPU_AGGS.index(agg)
    x = make_policy_inputs(8, 1000, seed=seed, drift=0.5, ref=True, entropy=True, is_weights=True,
                           per_token_advantages=method == "cispo", device="cuda")
    got = check_backend(x, backend, dtype=dtype, method=method, agg=agg, clip_high=0.28, kl_coef=0.05,
                        entropy_coef=0.01)
    assert got[2][0].dtype == dtype and got[2][0].device.type == "cuda"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize(
    "opts",
    [
        dict(method="ppo", dual_clip=1.5, clip_low=0.1, kl_estimator="k2"),
        dict(method="gspo", clip_low=0.05, clip_high=0.08, dual_clip=1.3, kl_estimator="k1"),
        dict(method="sapo", tau_pos=0.5, tau_neg=2.0),
        dict(method="cispo", cispo_floor=0.9, cispo_cap=1.1),
        dict(method="reinforce", reinforce_cap=1.1),
    ],
    ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()),
)
def test_gpu_method_options_and_extreme_ratios(backend, opts):
    _need_gpu_backend(backend)
    x = make_policy_inputs(6, 700, seed=7, drift=0.8, per_token_advantages=True, ref=True, is_weights=True,
                           device="cuda")
    with torch.no_grad():  # |log r| > 20 at some valid tokens: the clamp's zero-gradient branch
        x.old_logprobs[0, :3] = x.logprobs[0, :3] - 30.0
        x.old_logprobs[2, :2] = x.logprobs[2, :2] + 30.0
    check_backend(x, backend, agg="seq-mean-token-sum", kl_coef=0.1, **opts)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
def test_gpu_micro_batches_with_num_items_tensor(backend, agg):
    """num_items as a CUDA tensor (read by the kernel): micro-batches add up to the full batch."""
    _need_gpu_backend(backend)
    x = make_policy_inputs(6, 300, seed=19, ref=True, entropy=True, device="cuda")
    opts = dict(method="gspo", agg=agg, kl_coef=0.1, entropy_coef=0.02)
    count = x.mask.sum().float() if agg == "token-mean" else torch.tensor(6.0, device="cuda")
    _check_micro_batches(x, backend, count, **opts)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("value", UNCHECKED_NUM_ITEMS, ids=str)
def test_gpu_num_items_tensor_has_one_meaning(backend, value):
    """The CUDA kernels read a tensor num_items on the device, unchecked: the same one meaning."""
    _need_gpu_backend(backend)
    _check_unchecked_num_items(backend, value, "token-mean", device="cuda")


@pytest.mark.gpu
def test_gpu_cuda_backend_never_syncs():
    """The cuda backend reads nothing on the host (num_items included): CUDA's sync debug mode
    turns any synchronizing call into an error."""
    _need_gpu_backend("cuda")
    x = make_policy_inputs(8, 512, seed=59, ref=True, entropy=True, is_weights=True, device="cuda")
    opts = dict(method="gspo", agg="seq-mean-token-mean", kl_coef=0.1, entropy_coef=0.01,
                num_items=torch.tensor(5.0, device="cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, metrics = erpd.policy_loss(x.logprobs, x.old_logprobs, x.advantages, x.mask, backend="cuda",
                                         validate=False, **x.kwargs(), **opts)
        g_lp, g_h = torch.autograd.grad(loss, [x.logprobs, x.entropy])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref, ref_metrics = erpd.policy_loss(x.logprobs, x.old_logprobs, x.advantages, x.mask, backend="torch",
                                        **x.kwargs(), **opts)
    r_lp, r_h = torch.autograd.grad(ref, [x.logprobs, x.entropy])
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    for k in ref_metrics:
        torch.testing.assert_close(metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_lp, r_lp, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_h, r_h, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# The reference against hand-computed values (so that the ground truth is itself pinned).
# --------------------------------------------------------------------------------------------


def _ref_token(method, log_r, adv, **opts):
    """Loss and d loss / d logprob of a single valid token through the reference."""
    lp = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    old = lp.detach() - log_r
    loss, _ = erpd.reference.policy_loss(lp, old, torch.tensor([adv], dtype=torch.float64),
                                         torch.ones(1, 1, dtype=torch.bool), method=method, **opts)
    (g,) = torch.autograd.grad(loss, lp)
    return loss.item(), g.item()


@pytest.mark.parametrize(
    "log_r, adv, loss, grad",
    [
        (math.log(1.1), 1.0, -1.1, -1.1),  # inside the clip: plain -A r, gradient -A r
        (math.log(1.5), 1.0, -1.28, 0.0),  # above 1 + clip_high = 1.28 with A > 0: clipped, no gradient
        (math.log(1.5), -1.0, 1.5, 1.5),  # A < 0: the unclipped term is the max
        (math.log(0.5), -1.0, 0.8, 0.0),  # below 1 - clip_low = 0.8 with A < 0: clipped
        (math.log(0.5), 2.0, -1.0, -1.0),  # A > 0 below the range: unclipped
        (math.log(4.0), -1.0, 3.0, 0.0),  # dual clip c = 3 caps the loss at -c A, no gradient
    ],
)
def test_reference_ppo_clip_higher_by_hand(log_r, adv, loss, grad):
    got = _ref_token("ppo", log_r, adv, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    assert got == pytest.approx((loss, grad), abs=1e-12)


@pytest.mark.parametrize("log_r, adv, tau", [(0.0, 1.0, 1.0), (0.3, 1.0, 1.0), (-0.4, -2.0, 1.05)])
def test_reference_sapo_by_hand(log_r, adv, tau):
    r = math.exp(log_r)
    s = 1.0 / (1.0 + math.exp(-tau * (r - 1.0)))
    got = _ref_token("sapo", log_r, adv, tau_pos=1.0, tau_neg=1.05)
    assert got == pytest.approx((-adv * 4.0 / tau * s, -4.0 * adv * s * (1 - s) * r), abs=1e-12)
    if log_r == 0.0:
        assert got[1] == pytest.approx(-adv)  # the plain policy gradient at r = 1


def test_reference_cispo_and_gspo_by_hand():
    # cispo: -min(r, cap) A x with x = -1: value min(r, cap) A, gradient -min(r, cap) A.
    assert _ref_token("cispo", math.log(6.0), 1.0, cispo_cap=5.0) == pytest.approx((5.0, -5.0))
    # gspo on two tokens: s = exp(mean log r); token-mean of the ppo loss on s.
    lp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    old = lp.detach() - torch.tensor([[0.1, 0.3]], dtype=torch.float64)
    loss, _ = erpd.reference.policy_loss(lp, old, torch.tensor([1.0], dtype=torch.float64),
                                         torch.ones(1, 2, dtype=torch.bool), method="gspo", clip_low=0.5)
    s = math.exp(0.2)
    (g,) = torch.autograd.grad(loss, lp)
    assert loss.item() == pytest.approx(-s)
    assert g[0].tolist() == pytest.approx([-s / 2, -s / 2])
