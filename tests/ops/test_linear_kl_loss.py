"""linear_kl with a reduction ("mean" / "sum"): the grads-in-forward loss against the float64
reference (values and every student gradient, fp32 and bf16, ignored rows, token weights),
micro-batches whose num_items make them sum to the full batch, the per-token op reduced
through autograd, the errors, and the claim that its backward makes no vocabulary pass.

Tolerance rule (docs/design.md §5): error vs float64 at most 2x the error of plain PyTorch
(naive_linear_kl reduced the same way) in the same input precision.
"""

from collections import Counter

import pytest
import test_numerics
import torch

import erpd
from erpd.testing import assert_within_rule, gemm_counts, make_kl_teacher, make_linear_inputs, naive_linear_kl

DIRECTIONS = ("forward", "reverse", "jsd")


def _to64(teacher: dict) -> dict:
    return {k: None if t is None else (t[0].double(), t[1]) if k == "teacher_topk" else t.double()
            for k, t in teacher.items()}


def _reference_loss(kl, targets, reduction, num_items=None, token_weights=None, ignore_index=-100):
    """The reduction written out on per-token values (float64 for the reference)."""
    valid = torch.ones_like(kl, dtype=torch.bool) if targets is None else targets != ignore_index
    w = valid.to(kl.dtype) if token_weights is None else torch.where(valid, token_weights.to(kl.dtype), 0.0)
    total = (kl * w).sum()
    if reduction == "sum":
        return total
    return total / (valid.sum() if num_items is None else torch.as_tensor(num_items)).clamp_min(1).to(kl.dtype)


def _grads(x):
    return {k: getattr(x, k).grad for k in ("hidden", "weight", "bias")
            if getattr(x, k) is not None and getattr(x, k).requires_grad}


def _run(x, teacher, backend, reduction, token_weights=None, num_items=None, **kw):
    """Loss and the student's gradients of one provider on fresh leaves."""
    if backend == "naive":
        kl = naive_linear_kl(x.hidden, x.weight, x.targets, x.bias, **teacher, **kw)
        loss = _reference_loss(kl, x.targets, reduction, num_items, token_weights)
    else:
        loss = erpd.linear_kl(x.hidden, x.weight, x.targets, bias=x.bias, backend=backend, reduction=reduction,
                              num_items=num_items, token_weights=token_weights, **teacher, **kw)
    (loss * 1.7).backward()
    return loss.detach(), _grads(x)


def check_loss(x, teacher, backend, reduction="mean", token_weights=None, num_items=None, **kw):
    """`backend`'s reduced loss and gradients vs the float64 reference under the tolerance rule."""
    y = x.to64()
    ref_kl = erpd.reference.linear_kl(y.hidden, y.weight, y.targets, bias=y.bias, **_to64(teacher), **kw)
    ref_loss = _reference_loss(ref_kl, y.targets, reduction, num_items,
                               None if token_weights is None else token_weights.double())
    (ref_loss * 1.7).backward()
    ref = (ref_loss.detach(), _grads(y))
    got = _run(x.clone(), teacher, backend, reduction, token_weights, num_items, **kw)
    base = _run(x.clone(), teacher, "naive", reduction, token_weights, num_items, **kw)
    assert got[0].dtype == torch.float32 and got[0].shape == ()
    assert_within_rule(got[0], ref[0], base[0], name=f"{backend} loss")
    assert set(got[1]) == set(ref[1])
    for k in ref[1]:
        assert got[1][k].dtype == getattr(x, k).dtype, f"grad of {k} has dtype {got[1][k].dtype}"
        assert_within_rule(got[1][k], ref[1][k], base[1][k], name=f"{backend} d{k}")
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("form", ["fused", "dense"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_vs_reference(kl_backend, direction, form, dtype):
    x = make_linear_inputs(37, 48, 1001, bias=True, ignore_frac=0.2, dtype=dtype, seed=1)
    # The fused teacher has its own hidden size (40 != 48) and a bias.
    teacher = make_kl_teacher(x, form, h=40, bias=True, seed=2)
    check_loss(x, teacher, kl_backend, "mean", direction=direction, beta=0.3, temperature=0.7)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_sum_with_token_weights(kl_backend, direction):
    x = make_linear_inputs((3, 11), 32, 257, ignore_frac=0.2, seed=3)
    w = torch.rand(3, 11, generator=torch.Generator().manual_seed(4)) * 2
    w[0, :4] = 0.0  # a trust-region mask's zeros
    w[x.targets == -100] = float("nan")  # never read at ignored tokens
    check_loss(x, make_kl_teacher(x, "fused", seed=5), kl_backend, "sum", token_weights=w, direction=direction,
               beta=0.6)


@pytest.mark.parametrize("direction", ["forward", "jsd"])
def test_micro_batches_with_num_items_sum_to_the_full_batch(kl_backend, direction):
    """Gradient accumulation as a trainer does it: each micro-batch's mean over the step's token
    count, backpropagated into the shared head, equals one mean over the whole batch."""
    x = make_linear_inputs((4, 9), 32, 301, bias=True, ignore_frac=0.25, seed=6)
    teacher = make_kl_teacher(x, "fused", h=24, seed=7)
    kw = dict(direction=direction, beta=0.4, temperature=0.8, backend=kl_backend)
    full = x.clone()
    loss = erpd.linear_kl(full.hidden, full.weight, full.targets, bias=full.bias, reduction="mean", **teacher, **kw)
    loss.backward()
    count = int((x.targets != -100).sum())
    acc = x.clone()
    total = 0.0
    for sl, n_items in ((slice(0, 1), count), (slice(1, 4), torch.tensor(count))):  # a number, then a tensor
        t = {k: v[sl] if k == "teacher_hidden" else v for k, v in teacher.items()}
        part = erpd.linear_kl(acc.hidden[sl], acc.weight, acc.targets[sl], bias=acc.bias, reduction="mean",
                              num_items=n_items, **t, **kw)
        part.backward()
        total = total + part.detach()
    torch.testing.assert_close(total, loss.detach(), rtol=1e-5, atol=1e-7)
    for k in ("hidden", "weight", "bias"):
        torch.testing.assert_close(getattr(acc, k).grad, getattr(full, k).grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("form", ["fused", "dense"])
def test_equals_the_per_token_op_reduced(kl_backend, reduction, form):
    """Same backend, same kernels: the per-token op reduced through autograd (a backward pass over
    the vocabulary) vs the grads-in-forward loss."""
    x = make_linear_inputs(29, 40, 513, bias=True, ignore_frac=0.2, seed=8)
    teacher = make_kl_teacher(x, form, seed=9)
    w = torch.rand(29, generator=torch.Generator().manual_seed(10))
    kw = dict(direction="reverse", temperature=1.2, backend=kl_backend)
    a, b = x.clone(), x.clone()
    fused = erpd.linear_kl(a.hidden, a.weight, a.targets, bias=a.bias, reduction=reduction, token_weights=w,
                           **teacher, **kw)
    fused.backward()
    kl = erpd.linear_kl(b.hidden, b.weight, b.targets, bias=b.bias, **teacher, **kw)
    unfused = _reference_loss(kl, b.targets, reduction, token_weights=w)
    unfused.backward()
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-6)
    for k in ("hidden", "weight", "bias"):
        torch.testing.assert_close(getattr(a, k).grad, getattr(b, k).grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 2 * 4 * 1001])
@pytest.mark.parametrize("form", ["fused", "dense"])
def test_chunk_boundaries_of_the_cpp_driver(monkeypatch, chunk_bytes, form):
    """One row per chunk, and 3-row chunks with a ragged last one (two fp32 blocks per row)."""
    if not erpd._ext.has_cpu():
        pytest.skip("erpd._C not built")
    monkeypatch.setenv("ERPD_CHUNK_BYTES", str(chunk_bytes))
    x = make_linear_inputs(37, 96, 1001, bias=True, ignore_frac=0.2, seed=36)
    for direction in DIRECTIONS:
        check_loss(x.clone(), make_kl_teacher(x, form, h=32, seed=37), "cpu", "mean", direction=direction, beta=0.4,
                   temperature=0.7)


def test_topk_teacher_and_torch_backend_reduce_the_per_token_op(cpu_backend):
    x = make_linear_inputs(23, 32, 300, ignore_frac=0.2, seed=11)
    check_loss(x, make_kl_teacher(x, "topk", k=8, seed=12), cpu_backend, "mean", num_items=40)
    y = make_linear_inputs(23, 32, 300, ignore_frac=0.2, seed=13)
    check_loss(y, make_kl_teacher(y, "fused", seed=14), "torch", "sum", direction="jsd")


def test_float64_on_the_torch_backend():
    x = make_linear_inputs(8, 16, 50, dtype=torch.float64, seed=15)
    loss = erpd.linear_kl(x.hidden, x.weight, x.targets, backend="torch", reduction="mean",
                          **make_kl_teacher(x, "dense", seed=16))
    assert loss.dtype == torch.float64 and loss.shape == ()


def test_all_ignored_empty_and_targets_none(kl_backend):
    x = make_linear_inputs(12, 32, 128, bias=True, seed=17)
    teacher = make_kl_teacher(x, "fused", seed=18)
    a = x.clone()  # targets None: every row counts

    loss = erpd.linear_kl(a.hidden, a.weight, None, bias=a.bias, backend=kl_backend, reduction="mean", **teacher)
    ref = erpd.reference.linear_kl(x.hidden.double(), x.weight.double(), None, bias=x.bias.double(), **_to64(teacher))
    torch.testing.assert_close(loss.double(), ref.mean(), rtol=1e-5, atol=1e-6)
    b = x.clone()
    ignored = torch.full_like(x.targets, -100)
    loss = erpd.linear_kl(b.hidden, b.weight, ignored, bias=b.bias, backend=kl_backend, reduction="mean", **teacher)
    assert loss.item() == 0.0
    loss.backward()
    for t in (b.hidden, b.weight, b.bias):
        assert (t.grad == 0).all()
    e = make_linear_inputs(0, 32, 128, seed=19)
    loss = erpd.linear_kl(e.hidden, e.weight, e.targets, backend=kl_backend, reduction="sum",
                          **make_kl_teacher(e, "fused", seed=20))
    assert loss.shape == () and loss.item() == 0.0
    loss.backward()
    assert e.hidden.grad.shape == (0, 32) and (e.weight.grad == 0).all()


def test_frozen_head_and_frozen_hidden(kl_backend):
    x = make_linear_inputs(37, 64, 1001, ignore_frac=0.2, seed=21)
    x.weight.requires_grad_(False)
    check_loss(x, make_kl_teacher(x, "dense", seed=22), kl_backend, "sum", direction="jsd", beta=0.2)
    y = make_linear_inputs(37, 64, 1001, ignore_frac=0.2, seed=23)
    y.hidden.requires_grad_(False)
    check_loss(y, make_kl_teacher(y, "fused", seed=24), kl_backend, "mean")


def test_module_form_passes_num_items_and_token_weights(kl_backend):
    x = make_linear_inputs((2, 9), 32, 128, ignore_frac=0.3, seed=25)
    teacher = make_kl_teacher(x, "fused", seed=26)
    w = torch.rand(2, 9, generator=torch.Generator().manual_seed(27))
    mod = erpd.nn.LinearKL(direction="jsd", beta=0.3, reduction="mean", backend=kl_backend)
    out = mod(x.hidden, x.weight, x.targets, num_items=50, token_weights=w, **teacher)
    kl = erpd.reference.linear_kl(x.hidden.detach().double(), x.weight.detach().double(), x.targets, direction="jsd",
                                  beta=0.3, **_to64(teacher))
    torch.testing.assert_close(out.double(), _reference_loss(kl, x.targets, "mean", 50, w.double()), rtol=1e-5,
                               atol=1e-6)


def test_errors(kl_backend):
    x = make_linear_inputs(6, 16, 40, ignore_frac=0.3, seed=28)
    teacher = make_kl_teacher(x, "fused", seed=29)
    kl = lambda **kw: erpd.linear_kl(x.hidden, x.weight, x.targets, backend=kl_backend, **teacher, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"reduction must be one of \('none', 'sum', 'mean'\), got 'avg'"):
        kl(reduction="avg")
    with pytest.raises(ValueError, match="num_items and token_weights weight a reduced loss"):
        kl(num_items=4)
    with pytest.raises(ValueError, match="num_items and token_weights weight a reduced loss"):
        kl(reduction="none", token_weights=torch.ones(6))
    with pytest.raises(ValueError, match="reduction='sum' divides by nothing"):
        kl(reduction="sum", num_items=4)
    with pytest.raises(ValueError, match="num_items must be"):
        kl(reduction="mean", num_items=0)
    with pytest.raises(ValueError, match=r"token_weights must have the targets' shape \[6\], got \[3, 2\]"):
        kl(reduction="sum", token_weights=torch.ones(3, 2))
    with pytest.raises(TypeError, match="token_weights must be a floating tensor"):
        kl(reduction="sum", token_weights=torch.ones(6, dtype=torch.long))
    valid = (x.targets != -100).nonzero()[0, 0]
    bad = torch.ones(6)
    bad[valid] = float("nan")
    with pytest.raises(ValueError, match=r"token_weights is NaN or inf at 1 counted \(not ignored\) position"):
        kl(reduction="sum", token_weights=bad)
    bad[valid] = -1.0
    with pytest.raises(ValueError, match="token_weights must be >= 0"):
        kl(reduction="sum", token_weights=bad)
    loss = kl(reduction="mean")
    if kl_backend != "torch":
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="retain_graph=True is not supported"):
            loss.backward()


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_masked_vocabulary_and_far_negative_logits(kl_backend, direction):
    """-inf logits (whole leading blocks, then scattered ids) in the student's bias and the fused
    teacher's, every other logit shifted by -100 (so both log-sum-exps are far below the exp
    range): loss and gradients equal the float64 loss on the vocabulary without the masked ids,
    unshifted (the divergence does not depend on the shift); the masked rows of the head get 0."""
    x = test_numerics._masked_inputs(23)
    x.bias = (x.bias.detach() - 100.0).requires_grad_()
    fused = make_kl_teacher(x, "fused", bias=True, seed=24)
    fused["teacher_bias"] = fused["teacher_bias"] - 100.0
    fused["teacher_bias"][test_numerics.MASKED] = float("-inf")
    kw = dict(direction=direction, beta=0.3, temperature=0.9)
    c = x.clone()
    loss = erpd.linear_kl(c.hidden, c.weight, c.targets, bias=c.bias, backend=kl_backend, reduction="sum", **fused, **kw)
    loss.backward()
    kept, keep = test_numerics._on_kept(x), test_numerics.KEPT
    kept.bias = (kept.bias.detach() + 100.0).requires_grad_()
    ref = erpd.reference.linear_kl(kept.hidden, kept.weight, kept.targets, bias=kept.bias,
                                   teacher_hidden=fused["teacher_hidden"].double(),
                                   teacher_weight=fused["teacher_weight"][keep].double(),
                                   teacher_bias=fused["teacher_bias"][keep].double() + 100.0, **kw).sum()
    ref.backward()
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss.double(), ref, **tol)
    torch.testing.assert_close(c.hidden.grad.double(), kept.hidden.grad, **tol)
    torch.testing.assert_close(c.weight.grad[keep].double(), kept.weight.grad, **tol)
    assert (c.weight.grad[test_numerics.MASKED] == 0).all() and (c.bias.grad[test_numerics.MASKED] == 0).all()


def test_nan_row_poisons_the_loss_and_its_own_hidden_grad_only(kl_backend):
    x = make_linear_inputs(19, 32, 301, seed=25)
    teacher = make_kl_teacher(x, "fused", seed=26)
    h = x.hidden.detach().clone()
    h[4, 7] = float("nan")
    h.requires_grad_()
    loss = erpd.linear_kl(h, x.weight, x.targets, backend=kl_backend, reduction="mean", direction="reverse", **teacher)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(h.grad[4]).all()
    assert torch.isfinite(h.grad[torch.arange(19) != 4]).all()


# --------------------------------------------------------------------------------------------
# The backward makes no pass over the vocabulary.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form, per_chunk", [("fused", 4), ("dense", 3)])
def test_cpugemm_counts(monkeypatch, form, per_chunk):
    """Forward: per row chunk the student's (and the fused teacher's) logits, dh and dW GEMMs
    (8·N·H·V FLOPs at equal sizes), nothing recomputed. Backward: no GEMM, no erpd kernel."""
    if "cpu" not in erpd.available("cpu", "linear_kl"):
        pytest.skip("erpd._C not built")
    monkeypatch.setenv("ERPD_CHUNK_BYTES", str(2 * 16 * 4 * 101))  # two blocks of 16 rows: 39 -> 16, 16, 7
    x = make_linear_inputs(39, 32, 101, bias=True, ignore_frac=0.2, seed=30)
    teacher = make_kl_teacher(x, form, seed=31)
    out = {}

    def fwd():
        out["loss"] = erpd.linear_kl(x.hidden, x.weight, x.targets, bias=x.bias, reduction="mean", direction="jsd",
                                     backend="cpu", **teacher)

    f_gemms, _ = gemm_counts(fwd)
    b_gemms, b_all = gemm_counts(lambda: out["loss"].backward())
    assert sum(f_gemms.values()) == per_chunk * 3, f_gemms
    assert b_gemms == {}, f"backward ran GEMMs: {b_gemms}"
    assert not any(name.startswith("erpd::") for name in b_all), "backward called an erpd kernel"
    assert x.hidden.grad is not None and x.weight.grad is not None and x.bias.grad is not None


def test_triton_backward_launches_nothing(monkeypatch):
    if "triton" not in erpd.available("cpu", "linear_kl"):
        pytest.skip("triton backend not available on CPU here (needs TRITON_INTERPRET=1)")
    from erpd.kernels import linear_kl as k

    calls = Counter()
    for name in ("linear_kl_fwd", "linear_kl_bwd"):
        orig = getattr(k, name)

        def wrapped(*a, _orig=orig, _name=name, **kw):
            calls[_name] += 1
            return _orig(*a, **kw)

        monkeypatch.setattr(k, name, wrapped)
    x = make_linear_inputs(20, 32, 101, ignore_frac=0.2, seed=32)
    loss = erpd.linear_kl(x.hidden, x.weight, x.targets, reduction="sum", backend="triton",
                          **make_kl_teacher(x, "fused", seed=33))
    assert calls == Counter(linear_kl_fwd=1, linear_kl_bwd=1)
    calls.clear()
    b_gemms, _ = gemm_counts(lambda: loss.backward())
    assert not calls and b_gemms == {}, (calls, b_gemms)
    assert x.hidden.grad is not None and x.weight.grad is not None


# --------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("form,direction", [("fused", "forward"), ("fused", "reverse"), ("fused", "jsd"),
                                            ("dense", "forward")], ids=str)
def test_gpu_backends(backend, dtype, form, direction):
    if backend not in erpd.available("cuda", op="linear_kl"):
        pytest.skip(f"{backend} not available on CUDA here")
    x = make_linear_inputs(1024, 1024, 32000, bias=True, ignore_frac=0.2, dtype=dtype, device="cuda", seed=34)
    check_loss(x, make_kl_teacher(x, form, h=768, seed=35), backend, "mean", direction=direction, beta=0.3,
               temperature=0.8)


@pytest.mark.parametrize("form", ["fused", "dense"])
def test_cpu_gemms_split_between_threads(split_gemms, form):
    """Every GEMM split between two threads (the split_gemms fixture)."""
    split_gemms(buffers=2)
    x = make_linear_inputs(600, 32, 1100, bias=True, ignore_frac=0.2, seed=64)
    for direction in DIRECTIONS:
        check_loss(x.clone(), make_kl_teacher(x, form, h=24, bias=True, seed=65), "cpu", "mean", direction=direction,
                   beta=0.3, temperature=0.7)
