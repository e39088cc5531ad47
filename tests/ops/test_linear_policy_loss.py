"""linear_policy_loss: the fused op against the float64 reference composition, against the unfused
composition of erpd ops, micro-batching, and the claim that its backward makes no vocabulary pass.

Tolerance rule (docs/design.md §5): error vs float64 at most 2x the error of plain PyTorch
(naive_linear_logprobs + the reference policy loss) in the same input precision.
"""

from collections import Counter

import pytest
import torch

import erpd
from erpd.reference import POLICY_AGGS, POLICY_METHODS
from erpd.testing import assert_within_rule, gemm_counts, make_linear_policy_inputs, naive_linear_logprobs, three_way

TINY = dict(b=3, t=13, h=32, v=101)  # 39 rows: cheap under the Triton interpreter


def _side(x):
    return dict(ref_logprobs=x.ref_logprobs, is_weights=x.is_weights)


def _grads(loss, lin):
    wrt = [t for t in (lin.hidden, lin.weight, lin.bias) if t is not None and t.requires_grad]
    return dict(zip(("hidden", "weight", "bias"), torch.autograd.grad(loss * 1.7, wrt)))


def _run(x, backend, temperature=1.0, ignore_index=-100, **opts):
    lin = x.linear
    if backend == "naive":
        lp, ent = naive_linear_logprobs(lin.hidden, lin.weight, lin.targets, bias=lin.bias, temperature=temperature,
                                        ignore_index=ignore_index)
        valid = x.mask & (lin.targets != ignore_index)
        loss, metrics = erpd.reference.policy_loss(lp, x.old_logprobs, x.advantages, valid, entropy=ent, **_side(x), **opts)
    else:
        loss, metrics = erpd.linear_policy_loss(
            lin.hidden, lin.weight, lin.targets, x.old_logprobs, x.advantages, x.mask, bias=lin.bias,
            temperature=temperature, ignore_index=ignore_index, backend=backend, **_side(x), **opts,
        )
    return loss.detach(), metrics, _grads(loss, lin)


def check_backend(x, backend, **opts):
    ref, base, got = three_way(lambda y, provider: _run(y, provider, **opts), backend, exact=x.to64, fresh=x.clone)
    assert got[0].dtype == torch.float32 and got[0].shape == ()
    assert_within_rule(got[0], ref[0], base[0], name=f"{backend} loss")
    assert set(got[1]) == set(ref[1]), f"{backend} metrics {sorted(got[1])} != {sorted(ref[1])}"
    for k in ref[1]:
        assert_within_rule(got[1][k], ref[1][k], base[1][k], name=f"{backend} metric {k}")
    assert set(got[2]) == set(ref[2])
    for k in ref[2]:
        assert got[2][k].dtype == getattr(x.linear, k).dtype and got[2][k].shape == getattr(x.linear, k).shape
        assert_within_rule(got[2][k], ref[2][k], base[2][k], name=f"{backend} d{k}")
    return got


@pytest.mark.parametrize("agg", POLICY_AGGS)
@pytest.mark.parametrize("method", POLICY_METHODS)
def test_methods_and_aggregations(cpu_backend, method, agg):
    seed = POLICY_METHODS.index(method) * 5 + POLICY_AGGS.index(agg)
    x = make_linear_policy_inputs(**TINY, seed=seed, ref=True)
    check_backend(x, cpu_backend, method=method, agg=agg, kl_coef=0.05, entropy_coef=0.02)


@pytest.mark.parametrize("method", ["ppo", "gspo", "cispo"])
def test_bias_temperature_ignored_rows_and_side_inputs(cpu_backend, method):
    x = make_linear_policy_inputs(**TINY, seed=7, temperature=0.7, bias=True, ignore_frac=0.2, drift=0.5,
                                  per_token_advantages=True, ref=True, is_weights=True)
    check_backend(x, cpu_backend, temperature=0.7, method=method, agg="seq-mean-token-mean", clip_high=0.28,
                  kl_coef=0.1, kl_estimator="k2", entropy_coef=0.01,
                  **(dict(dual_clip=2.0) if method != "cispo" else dict(cispo_cap=1.3)))


@pytest.mark.parametrize("clips", [dict(clip_high=float("inf")), dict(clip_low=1.0, clip_high=float("inf")),
                                   dict(clip_low=1.0, clip_high=0.1)])
def test_no_ceiling_and_no_floor(cpu_backend, clips):
    """clip_high=inf removes the ceiling and clip_low=1 the floor; drift=1.5 puts ratios far outside
    [0.8, 1.2] both ways, so a clip that still acted would change the loss and the gradients."""
    x = make_linear_policy_inputs(**TINY, seed=17, drift=1.5, per_token_advantages=True)
    got = check_backend(x, cpu_backend, method="ppo", **clips)
    if clips["clip_high"] == float("inf"):
        assert got[1]["clipfrac_high"] == 0
    if clips.get("clip_low") == 1.0:
        assert got[1]["clipfrac_low"] == 0


def test_unbounded_ppo_is_the_plain_ratio_objective():
    """With neither floor nor ceiling, ppo is -r A summed as the aggregation says, whatever the drift."""
    x = make_linear_policy_inputs(**TINY, seed=18, drift=2.0, per_token_advantages=True)
    lin = x.linear
    loss, metrics = erpd.linear_policy_loss(lin.hidden, lin.weight, lin.targets, x.old_logprobs, x.advantages, x.mask,
                                            clip_low=1.0, clip_high=float("inf"), backend="torch")
    lp, _ = erpd.reference.linear_logprobs(lin.hidden, lin.weight, lin.targets)
    valid = x.mask & (lin.targets != -100)
    r = (lp - x.old_logprobs).clamp(-20, 20).exp()
    expected = -(r * x.advantages * valid).sum() / valid.sum()
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)
    assert metrics["clipfrac"] == 0 and metrics["num_valid"] == valid.sum()


def test_returns_its_logprobs_and_counts(cpu_backend):
    """return_logprobs: the per-token log-probs the op computed (equal to linear_logprobs', detached);
    num_valid: the valid-token count its means are over."""
    x = make_linear_policy_inputs(**TINY, seed=19, bias=True, ignore_frac=0.2)
    lin = x.linear
    kw = dict(bias=lin.bias, temperature=0.8, backend=cpu_backend)
    loss, metrics = erpd.linear_policy_loss(lin.hidden, lin.weight, lin.targets, x.old_logprobs, x.advantages, x.mask,
                                            return_logprobs=True, **kw)
    lp, _ = erpd.linear_logprobs(lin.hidden, lin.weight, lin.targets, **kw)
    got = metrics["logprobs"]
    assert got.shape == lin.targets.shape and got.dtype == torch.float32 and not got.requires_grad
    ignored = lin.targets == -100
    assert torch.allclose(got[~ignored], lp.detach()[~ignored], atol=1e-6) and (got[ignored] == 0).all()
    assert metrics["num_valid"] == (x.mask & ~ignored).sum()
    _, plain = erpd.linear_policy_loss(lin.hidden, lin.weight, lin.targets, x.old_logprobs, x.advantages, x.mask, **kw)
    assert "logprobs" not in plain
    loss.backward()  # the extra output does not get in the way of the gradients
    assert lin.hidden.grad is not None


@pytest.mark.parametrize("method", ["ppo", "gspo", "cispo"])
def test_kl_ratio_weighted(cpu_backend, method):
    x = make_linear_policy_inputs(**TINY, seed=17, drift=0.5, ref=True, is_weights=True)
    check_backend(x, cpu_backend, method=method, kl_coef=0.2, kl_ratio_weighted=True)


@pytest.mark.parametrize("method", ["ppo", "gspo"])
def test_equals_the_unfused_composition(cpu_backend, method):
    """Same backend, same kernels: linear_logprobs + policy_loss through autograd vs the fused op."""
    x = make_linear_policy_inputs(**TINY, seed=11, bias=True, ref=True, is_weights=True)
    opts = dict(method=method, agg="token-mean", kl_coef=0.1, entropy_coef=0.05, temperature=0.9)
    fused = _run(x.clone(), cpu_backend, **opts)
    y = x.clone()
    lin = y.linear
    lp, ent = erpd.linear_logprobs(lin.hidden, lin.weight, lin.targets, bias=lin.bias, temperature=0.9,
                                   with_entropy=True, backend=cpu_backend)
    kw = {k: v for k, v in opts.items() if k != "temperature"}
    loss, metrics = erpd.policy_loss(lp, y.old_logprobs, y.advantages, y.mask, entropy=ent, backend=cpu_backend,
                                     **_side(y), **kw)
    grads = _grads(loss, lin)
    torch.testing.assert_close(fused[0], loss.detach(), rtol=1e-5, atol=1e-6)
    for k in metrics:
        torch.testing.assert_close(fused[1][k], metrics[k], rtol=1e-5, atol=1e-6)
    for k in grads:
        torch.testing.assert_close(fused[2][k], grads[k], rtol=1e-5, atol=1e-6)


def test_on_policy_old_logprobs_none(cpu_backend):
    x = make_linear_policy_inputs(**TINY, seed=13)
    lin = x.linear
    loss, metrics = erpd.linear_policy_loss(lin.hidden, lin.weight, lin.targets, None, x.advantages, x.mask,
                                            method="ppo", backend=cpu_backend)
    g = _grads(loss, lin)
    y = x.clone()
    lp, _ = erpd.reference.linear_logprobs(y.linear.hidden, y.linear.weight, y.linear.targets)
    ref, _ = erpd.reference.policy_loss(lp, lp.detach(), y.advantages, y.mask)
    g_ref = _grads(ref, y.linear)
    assert metrics["ratio_min"].item() == 1.0 and metrics["ratio_max"].item() == 1.0
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["ppo", "cispo"])
def test_cpu_row_groups_split_sequences(method):
    """On CPU the fused epilogues run on groups of rows that fit 2 MiB (csrc/common/chunked.h
    cache_rows): 16 rows at V = 32768, which cut these sequences of 13 tokens anywhere."""
    if "cpu" not in erpd.available("cpu", "linear_policy_loss"):
        pytest.skip("erpd._C not built")
    x = make_linear_policy_inputs(3, 13, 16, 32768, seed=19, bias=True, ref=True, is_weights=True)
    check_backend(x, "cpu", method=method, agg="seq-mean-token-mean", kl_coef=0.1, entropy_coef=0.05)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batches_with_num_items_sum_to_the_full_batch(cpu_backend, agg):
    x = make_linear_policy_inputs(4, 9, 32, 101, seed=17, ref=True)
    opts = dict(method="ppo", agg=agg, kl_coef=0.1, entropy_coef=0.02)
    full = _run(x.clone(), cpu_backend, **opts)
    count = int(x.mask.sum()) if agg == "token-mean" else 4
    y = x.clone()
    total, dh = 0.0, []
    for sl in (slice(0, 1), slice(1, 4)):
        mb = y.rows(sl)
        loss, _ = erpd.linear_policy_loss(mb.linear.hidden, mb.linear.weight, mb.linear.targets, mb.old_logprobs,
                                          mb.advantages, mb.mask, num_items=count, backend=cpu_backend,
                                          ref_logprobs=mb.ref_logprobs, **opts)
        (loss * 1.7).backward()  # accumulates into the shared weight's .grad, as a trainer does
        total = total + loss.detach()
        dh.append(mb.linear.hidden.grad)
    torch.testing.assert_close(total, full[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat(dh), full[2]["hidden"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(y.linear.weight.grad, full[2]["weight"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_inputs(cpu_backend, dtype):
    x = make_linear_policy_inputs(**TINY, seed=19, bias=True, dtype=dtype, ref=True)
    check_backend(x, cpu_backend, method="sapo", agg="seq-mean-token-mean", kl_coef=0.1)


def test_frozen_head_and_no_grad(cpu_backend):
    x = make_linear_policy_inputs(**TINY, seed=23)
    x.linear.weight.requires_grad_(False)
    _, _, grads = check_backend(x, cpu_backend, method="ppo")
    assert set(grads) == {"hidden"}
    lin = x.linear
    with torch.no_grad():
        loss, metrics = erpd.linear_policy_loss(lin.hidden, lin.weight, lin.targets, x.old_logprobs, x.advantages,
                                                x.mask, backend=cpu_backend)
    ref, _ = erpd.linear_policy_loss(lin.hidden, lin.weight, lin.targets, x.old_logprobs, x.advantages, x.mask,
                                     backend="torch")
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)


def test_non_contiguous_hidden(cpu_backend):
    x = make_linear_policy_inputs(**TINY, seed=29)
    buf = torch.randn(32, 3 * 13 * 2).t().reshape(3, 26, 32)  # non-contiguous storage
    x.linear.hidden = buf[:, ::2].detach().requires_grad_()
    assert not x.linear.hidden.is_contiguous()
    check_backend(x, cpu_backend, method="gspo", agg="seq-mean-token-sum")


@pytest.mark.parametrize("chunk_bytes", [1, 5 * 4 * 101])
@pytest.mark.parametrize("method", ["ppo", "gspo"])
def test_chunks_that_split_sequences(monkeypatch, chunk_bytes, method):
    """The C++ driver's row chunks (1 row; 5 rows, ragged) cut sequences of T=13 anywhere."""
    if "cpu" not in erpd.available("cpu", "linear_policy_loss"):
        pytest.skip("erpd._C not built")
    monkeypatch.setenv("ERPD_CHUNK_BYTES", str(chunk_bytes))
    x = make_linear_policy_inputs(**TINY, seed=31, bias=True, ref=True)
    check_backend(x, "cpu", method=method, agg="seq-mean-token-mean", kl_coef=0.1, entropy_coef=0.05)


def test_second_backward_is_a_clear_error(cpu_backend):
    x = make_linear_policy_inputs(**TINY, seed=39)
    lin = x.linear
    loss, _ = erpd.linear_policy_loss(lin.hidden, lin.weight, lin.targets, x.old_logprobs, x.advantages, x.mask,
                                      backend=cpu_backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph=True is not supported"):
        loss.backward()


def test_module_form(cpu_backend):
    x = make_linear_policy_inputs(**TINY, seed=37)
    mod = erpd.nn.LinearPolicyLoss(temperature=0.8, method="cispo", agg="seq-mean-token-sum", backend=cpu_backend)
    lin = x.linear
    loss, metrics = mod(lin.hidden, lin.weight, lin.targets, x.old_logprobs, x.advantages, x.mask)
    ref, _ = erpd.linear_policy_loss(lin.hidden, lin.weight, lin.targets, x.old_logprobs, x.advantages, x.mask,
                                     temperature=0.8, method="cispo", agg="seq-mean-token-sum", backend="torch")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert "temperature=0.8" in repr(mod) and "cispo" in repr(mod)


# --------------------------------------------------------------------------------------------
# The backward makes no pass over the vocabulary.
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, gemms", [("ppo", 3 * 3), ("sapo", 3 * 3), ("gspo", 7 * 4)])
def test_cpugemm_counts(monkeypatch, method, gemms):
    """Forward: 3 GEMMs per row chunk (logits, dh, dW) = 6·N·H·V FLOPs for token-level methods
    (3 chunks here); gspo runs a log-prob pass, then the gradient pass, on the log-prob op's
    blocks (1 + 3 GEMMs on each of 7 blocks of 6 rows here: csrc/common/chunked.h cpu_blocks). Backward:
    none."""
    if "cpu" not in erpd.available("cpu", "linear_policy_loss"):
        pytest.skip("erpd._C not built")
    monkeypatch.setenv("ERPD_CHUNK_BYTES", str(16 * 4 * 101))  # 39 rows -> chunks of 16, 16, 7
    x = make_linear_policy_inputs(**TINY, seed=41, bias=True)
    lin = x.linear
    out = {}

    def fwd():
        out["loss"], _ = erpd.linear_policy_loss(lin.hidden, lin.weight, lin.targets, x.old_logprobs, x.advantages,
                                                 x.mask, bias=lin.bias, method=method, backend="cpu")

    f_gemms, _ = gemm_counts(fwd)
    b_gemms, b_all = gemm_counts(lambda: out["loss"].backward())
    assert sum(f_gemms.values()) == gemms, f_gemms
    assert b_gemms == {}, f"backward ran GEMMs: {b_gemms}"
    assert not any(name.startswith("erpd::") for name in b_all), "backward called an erpd kernel"
    assert lin.hidden.grad is not None and lin.weight.grad is not None and lin.bias.grad is not None


def test_triton_backward_launches_nothing(monkeypatch):
    if "triton" not in erpd.available("cpu", "linear_policy_loss"):
        pytest.skip("triton backend not available on CPU here (needs TRITON_INTERPRET=1)")
    from erpd.kernels import linear_logprobs as kl
    from erpd.kernels import policy_loss as kp

    calls = Counter()
    for mod, name in ((kl, "linear_logprobs_fwd"), (kl, "linear_logprobs_bwd"), (kp, "policy_loss_fwd")):
        orig = getattr(mod, name)

        def wrapped(*a, _orig=orig, _name=name, **k):
            calls[_name] += 1
            return _orig(*a, **k)

        monkeypatch.setattr(mod, name, wrapped)
    x = make_linear_policy_inputs(**TINY, seed=43)
    lin = x.linear
    loss, _ = erpd.linear_policy_loss(lin.hidden, lin.weight, lin.targets, x.old_logprobs, x.advantages, x.mask,
                                      backend="triton")
    assert calls == Counter(linear_logprobs_fwd=1, policy_loss_fwd=1, linear_logprobs_bwd=1)
    calls.clear()
    b_gemms, _ = gemm_counts(lambda: loss.backward())
    assert not calls and b_gemms == {}, (calls, b_gemms)
    assert lin.hidden.grad is not None and lin.weight.grad is not None


# --------------------------------------------------------------------------------------------
# GPU: the triton and cuda backends on CUDA tensors (skipped without a CUDA device).
# --------------------------------------------------------------------------------------------

GPU = dict(b=8, t=128, h=1024, v=32000)  # 1024 tokens; the cuda driver's default chunk (524 rows) splits row 4
GPU_CASES = [(m, a) for m in POLICY_METHODS for a in ("token-mean", "seq-mean-token-sum-norm")] + [
    ("ppo", "seq-mean-token-mean"), ("gspo", "seq-mean-token-mean"),
]


def _need_gpu_backend(backend):
    if backend not in erpd.available("cuda", "linear_policy_loss"):
        pytest.skip(f"{backend} not available for linear_policy_loss on CUDA here")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method, agg", GPU_CASES)
def test_gpu_backends(backend, dtype, method, agg):
    """Every method x two aggregations (plus seq-mean-token-mean for ppo and gspo) with bias,
    temperature, ignored targets, KL, entropy bonus and IS weights, vs the float64 reference."""
    _need_gpu_backend(backend)
    seed = 200 + GPU_CASES.index((method, agg))
    x = make_linear_policy_inputs(**GPU, seed=seed, temperature=0.9, bias=True, ignore_frac=0.1, drift=0.5,
                                  per_token_advantages=method == "cispo", ref=True, is_weights=True, dtype=dtype,
                                  device="cuda")
    check_backend(x, backend, temperature=0.9, method=method, agg=agg, clip_high=0.28, kl_coef=0.05,
                  entropy_coef=0.01)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk_rows", [1, 37])
@pytest.mark.parametrize("method", ["ppo", "gspo"])
def test_gpu_cuda_chunks_that_split_sequences(monkeypatch, chunk_rows, method):
    """Row chunks of 1 and 37 rows cut the T=128 sequences anywhere (a row's partial sums then
    come from several chunks)."""
    _need_gpu_backend("cuda")
    monkeypatch.setenv("ERPD_CHUNK_BYTES", str(chunk_rows * 4 * 4096))
    x = make_linear_policy_inputs(4, 128, 256, 4096, seed=31, bias=True, ref=True, is_weights=True, device="cuda")
    check_backend(x, "cuda", method=method, agg="seq-mean-token-mean", kl_coef=0.1, entropy_coef=0.05)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["ppo", "gspo"])
def test_gpu_cuda_equals_the_unfused_composition(method):
    """The fused cuda op vs erpd.linear_logprobs + erpd.policy_loss on the cuda backend."""
    _need_gpu_backend("cuda")
    x = make_linear_policy_inputs(4, 96, 512, 8192, seed=11, bias=True, ref=True, is_weights=True, device="cuda")
    opts = dict(method=method, agg="token-mean", kl_coef=0.1, entropy_coef=0.05, temperature=0.9)
    fused = _run(x.clone(), "cuda", **opts)
    y = x.clone()
    lin = y.linear
    lp, ent = erpd.linear_logprobs(lin.hidden, lin.weight, lin.targets, bias=lin.bias, temperature=0.9,
                                   with_entropy=True, backend="cuda")
    kw = {k: v for k, v in opts.items() if k != "temperature"}
    loss, metrics = erpd.policy_loss(lp, y.old_logprobs, y.advantages, y.mask, entropy=ent, backend="cuda",
                                     **_side(y), **kw)
    grads = _grads(loss, lin)
    torch.testing.assert_close(fused[0], loss.detach(), rtol=1e-5, atol=1e-6)
    for k in metrics:
        torch.testing.assert_close(fused[1][k], metrics[k], rtol=1e-5, atol=1e-6)
    for k in grads:  # cuBLAS may pick different GEMM algorithms for the two call shapes
        torch.testing.assert_close(fused[2][k], grads[k], rtol=1e-4, atol=1e-6)


def _kernel_names(fn):
    """Names of the CUDA kernels that `fn` launches, and its ATen GEMM counts."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.events()
    kernels = [e.name for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    counts = Counter(e.name for e in events if e.device_type == torch.autograd.DeviceType.CPU)
    return kernels, {k: counts[k] for k in GEMMS if counts[k]}, counts


def _is_vocab_pass(name):
    n = name.lower()
    # cuBLAS kernels (sm90_xmma_gemm..., nvjet..., cutlass...) and erpd's own epilogues.
    return any(s in n for s in ("gemm", "nvjet", "cutlass", "xmma", "erpd", "epilogue"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method, per_chunk", [("ppo", 3), ("sapo", 3), ("gspo", 4)])
def test_gpu_cuda_backward_makes_no_vocabulary_pass(monkeypatch, dtype, method, per_chunk):
    """cuda backend: 3 GEMMs per row chunk in the forward (logits, dh, dW; gspo adds its log-prob
    pass), and a backward that launches no GEMM and no erpd kernel, only the scaling of the saved
    gradients."""
    _need_gpu_backend("cuda")
    v = 32000
    monkeypatch.setenv("ERPD_CHUNK_BYTES", str(400 * 4 * v))  # 1024 rows -> chunks of 400, 400, 224
    x = make_linear_policy_inputs(**GPU, seed=41, bias=True, dtype=dtype, device="cuda")
    lin = x.linear
    out = {}

    def fwd():
        out["loss"], _ = erpd.linear_policy_loss(lin.hidden, lin.weight, lin.targets, x.old_logprobs, x.advantages,
                                                 x.mask, bias=lin.bias, method=method, backend="cuda")

    torch.cuda.synchronize()
    f_kernels, f_gemms, _ = _kernel_names(fwd)
    b_kernels, b_gemms, b_all = _kernel_names(lambda: out["loss"].backward())
    assert sum(f_gemms.values()) == gemms, f_gemms
    assert any("erpd" in k for k in f_kernels), f"no erpd kernel seen in the forward: {sorted(set(f_kernels))}"
    assert b_gemms == {}, f"backward ran GEMMs: {b_gemms}"
    assert not any(name.startswith("erpd::") for name in b_all), "backward called an erpd op"
    assert not any(_is_vocab_pass(k) for k in b_kernels), f"backward kernels: {b_kernels}"
    assert lin.hidden.grad is not None and lin.weight.grad is not None and lin.bias.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["ppo", "gspo"])
def test_gpu_cuda_backend_never_syncs(method):
    """No host synchronization in the cuda backend's forward or backward (num_items as a CUDA
    tensor included): CUDA's sync debug mode turns any synchronizing call into an error."""
    _need_gpu_backend("cuda")
    x = make_linear_policy_inputs(4, 64, 256, 4096, seed=43, bias=True, ref=True, device="cuda")
    opts = dict(method=method, agg="seq-mean-token-sum-norm", kl_coef=0.1, entropy_coef=0.01,
                num_items=torch.tensor(3.0, device="cuda"))
    y = x.clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, metrics = erpd.linear_policy_loss(
            y.linear.hidden, y.linear.weight, y.linear.targets, y.old_logprobs, y.advantages, y.mask,
            bias=y.linear.bias, ref_logprobs=y.ref_logprobs, backend="cuda", validate=False, **opts,
        )
        got = _grads(loss, y.linear)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref = _run(x.clone(), "torch", **opts)
    torch.testing.assert_close(loss.detach(), ref[0], rtol=1e-5, atol=1e-6)
    for k in ref[1]:
        torch.testing.assert_close(metrics[k], ref[1][k], rtol=1e-5, atol=1e-6)
    for k in ref[2]:
        torch.testing.assert_close(got[k], ref[2][k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["ppo", "gspo"])
def test_cpu_gemms_split_between_threads(split_gemms, method):
    """Every GEMM split between two threads (the split_gemms fixture)."""
    split_gemms(buffers=1)
    x = make_linear_policy_inputs(b=4, t=150, h=32, v=1100, seed=66, bias=True, ref=True)
    check_backend(x, "cpu", method=method, agg="seq-mean-token-mean", kl_coef=0.1, entropy_coef=0.05)
