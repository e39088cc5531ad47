"""linear_kl: every backend against the float64 reference, forward and backward, for every
direction and teacher form (fused, dense logits, top-k), plus the divergence's invariants.

Tolerance rule (docs/design.md §5): error vs float64 at most 2x the error plain PyTorch makes on the
same inputs in the same precision (erpd.testing.assert_within_rule).
"""

import math

import pytest
import torch

import erpd
from erpd.testing import assert_within_rule, make_kl_teacher, make_linear_inputs, naive_linear_kl, shapes, three_way
from erpd.testing.shapes import by_name

DIRECTIONS = ("forward", "reverse", "jsd")
CASES = [("fused", d) for d in DIRECTIONS] + [("dense", d) for d in DIRECTIONS] + [("topk", "forward")]
# oddv (V = 4099) costs seconds per case under the Triton interpreter: the slow tier.
INTERP_SHAPES = [pytest.param(s, marks=pytest.mark.slow) if s.name == "oddv" else s for s in shapes("interp")]


def _to64(teacher: dict) -> dict:
    out = {}
    for k, t in teacher.items():
        if k == "teacher_topk":
            out[k] = (t[0].double(), t[1])
        else:
            out[k] = None if t is None else t.double()
    return out


def _run(x, teacher, backend, g, **kw):
    """Forward + backward of one provider on fresh leaves; returns kl and the student's grads."""
    if backend == "naive":
        kl = naive_linear_kl(x.hidden, x.weight, x.targets, x.bias, **teacher, **kw)
    else:
        kl = erpd.linear_kl(x.hidden, x.weight, x.targets, bias=x.bias, backend=backend, **teacher, **kw)
    (kl * g.to(kl.device, kl.dtype)).sum().backward()
    grads = {k: getattr(x, k).grad for k in ("hidden", "weight", "bias") if getattr(x, k) is not None and getattr(x, k).requires_grad}
    return kl.detach(), grads


def check_kl(x, teacher, backend, *, seed=0, **kw):
    """Compare `backend` with the float64 reference under the tolerance rule; returns its kl."""
    g = torch.randn(x.targets.shape, generator=torch.Generator().manual_seed(seed + 17), dtype=torch.float64) * 2
    ref, base, got = three_way(lambda y, provider: _run(*y, provider, g, **kw), backend,
                               exact=lambda: (x.to64(), _to64(teacher)), fresh=lambda: (x.clone(), teacher))
    assert got[0].dtype == torch.float32 and got[0].shape == x.targets.shape
    assert_within_rule(got[0], ref[0], base[0], name=f"{backend} kl")
    assert set(got[1]) == set(ref[1])
    for k in ref[1]:
        assert got[1][k].dtype == getattr(x, k).dtype, f"grad of {k} has dtype {got[1][k].dtype}"
        assert_within_rule(got[1][k], ref[1][k], base[1][k], name=f"{backend} d{k}")
    return got[0]


@pytest.mark.parametrize("form,direction", CASES, ids=lambda c: str(c))
def test_vs_reference(kl_backend, form, direction):
    s = by_name("odd")
    x = make_linear_inputs(s.n, s.h, s.v, bias=True, ignore_frac=0.2, seed=1)
    # The fused teacher has its own hidden size (64 != 96) and a bias.
    teacher = make_kl_teacher(x, form, h=64, bias=True, seed=2)
    kl = check_kl(x, teacher, kl_backend, direction=direction, beta=0.3, temperature=0.7)
    assert (kl >= 0).all()
    assert (kl[x.targets == -100] == 0).all()


@pytest.mark.parametrize("shape", INTERP_SHAPES, ids=lambda s: s.id)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_interp_shapes(kl_backend, shape, direction):
    x = make_linear_inputs(shape.n, shape.h, shape.v, ignore_frac=0.1, seed=shape.n)
    check_kl(x, make_kl_teacher(x, "fused", seed=shape.v), kl_backend, direction=direction)


@pytest.mark.parametrize("form,direction", [("fused", "forward"), ("fused", "reverse"), ("fused", "jsd"), ("dense", "forward"), ("topk", "forward")], ids=str)
def test_bf16_inputs(kl_backend, form, direction):
    x = make_linear_inputs(37, 64, 1001, bias=True, ignore_frac=0.2, dtype=torch.bfloat16, seed=3)
    check_kl(x, make_kl_teacher(x, form, h=48, seed=4), kl_backend, direction=direction, beta=0.6, temperature=1.3)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_close_teacher(kl_backend, direction):
    """A teacher close to the student (KL ~ 1e-3): where relative accuracy is hardest."""
    x = make_linear_inputs(37, 64, 1001, seed=5)
    check_kl(x, make_kl_teacher(x, "fused", closeness=0.97, seed=6), kl_backend, direction=direction)


def test_realistic_vocab(kl_backend):
    if kl_backend == "triton" and erpd.backends.triton_interpreting():
        pytest.skip("the interpreter pays ~1 min per call at V=49152; the interp shapes cover the Triton tiling")
    s = by_name("smollm-vocab")
    x = make_linear_inputs(s.n, s.h, s.v, ignore_frac=0.2, seed=7)
    check_kl(x, make_kl_teacher(x, "fused", h=64, seed=8), kl_backend, direction="forward", temperature=0.9)


@pytest.mark.parametrize("form", ["fused", "dense", "topk"])
def test_zero_when_teacher_is_student(kl_backend, form):
    x = make_linear_inputs(37, 64, 1001, bias=True, seed=9)
    teacher = make_kl_teacher(x, form, closeness=1.0, k=16, seed=10)
    for direction in (["forward", "reverse", "jsd"] if form != "topk" else ["forward"]):
        kl = erpd.linear_kl(x.hidden, x.weight, x.targets, bias=x.bias, backend=kl_backend, direction=direction, **teacher)
        assert (kl >= 0).all() and kl.max() < 1e-5, f"{form}/{direction}: max {kl.max():.3e}"


def test_jsd_beta_endpoints_are_the_kls(kl_backend):
    """beta = 0 and 1 are the forward and the reverse KL (TRL's and Liger's definition)."""
    x = make_linear_inputs(16, 32, 128, seed=11)
    teacher = make_kl_teacher(x, "fused", seed=12)
    kl = lambda **kw: erpd.linear_kl(x.hidden, x.weight, x.targets, backend=kl_backend, **teacher, **kw)  # noqa: E731
    torch.testing.assert_close(kl(direction="jsd", beta=0.0), kl(direction="forward"), rtol=0, atol=0)
    torch.testing.assert_close(kl(direction="jsd", beta=1.0), kl(direction="reverse"), rtol=0, atol=0)
    # In between, the mixture form is bounded by log 2 per token (beta = 1/2) and by the KLs' mixture.
    mid = kl(direction="jsd", beta=0.5)
    assert (mid >= 0).all() and (mid <= math.log(2) + 1e-6).all()


def test_targets_none_ignored_rows_and_all_ignored(kl_backend):
    x = make_linear_inputs(20, 32, 128, bias=True, seed=13)
    teacher = make_kl_teacher(x, "fused", seed=14)
    full = erpd.linear_kl(x.hidden, x.weight, None, bias=x.bias, backend=kl_backend, **teacher)
    ref = erpd.reference.linear_kl(x.hidden.double(), x.weight.double(), None, bias=x.bias.double(), **_to64(teacher))
    torch.testing.assert_close(full.double(), ref, rtol=1e-4, atol=1e-5)
    x.targets[:] = -100
    kl = erpd.linear_kl(x.hidden, x.weight, x.targets, bias=x.bias, backend=kl_backend, direction="reverse", **teacher)
    assert (kl == 0).all()
    (kl * 3).sum().backward()
    for t in (x.hidden, x.weight, x.bias):
        assert (t.grad == 0).all()


def test_leading_dims_and_non_contiguous_teacher(kl_backend):
    x = make_linear_inputs((3, 7), 32, 257, ignore_frac=0.2, seed=15)
    teacher = make_kl_teacher(x, "fused", h=24, seed=16)
    # A strided teacher_hidden: the transpose of a [24, 3, 7] buffer.
    teacher["teacher_hidden"] = teacher["teacher_hidden"].permute(2, 0, 1).contiguous().permute(1, 2, 0)
    assert not teacher["teacher_hidden"].is_contiguous()
    kl = check_kl(x, teacher, kl_backend, direction="reverse", temperature=0.8)
    assert kl.shape == (3, 7)


def test_frozen_head_and_frozen_hidden(kl_backend):
    x = make_linear_inputs(37, 64, 1001, ignore_frac=0.2, seed=17)
    x.weight.requires_grad_(False)
    check_kl(x, make_kl_teacher(x, "dense", seed=18), kl_backend, direction="jsd", beta=0.2)
    y = make_linear_inputs(37, 64, 1001, ignore_frac=0.2, seed=19)
    y.hidden.requires_grad_(False)
    check_kl(y, make_kl_teacher(y, "topk", seed=20), kl_backend)


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 2 * 4 * 1001])
@pytest.mark.parametrize("form", ["fused", "dense"])
def test_chunk_boundaries_of_the_cpp_driver(monkeypatch, chunk_bytes, form):
    """Blocks of one row and 256 columns, and 11-row blocks of 256 columns, ragged in both
    directions (V = 1001; two fp32 buffers; jsd's forward: whole rows, 1 and 3 per chunk)."""
    if not erpd._ext.has_cpu():
        pytest.skip("erpd._C not built")
    monkeypatch.setenv("ERPD_CHUNK_BYTES", str(chunk_bytes))
    x = make_linear_inputs(37, 96, 1001, bias=True, ignore_frac=0.2, seed=21)
    for direction in DIRECTIONS:
        check_kl(x.clone(), make_kl_teacher(x, form, h=32, seed=22), "cpu", direction=direction, beta=0.4, temperature=0.7)


def test_nan_row_stays_in_its_row(kl_backend):
    x = make_linear_inputs(37, 64, 1001, seed=23)
    teacher = make_kl_teacher(x, "fused", seed=24)
    clean = erpd.linear_kl(x.hidden, x.weight, x.targets, backend=kl_backend, **teacher)
    h = x.hidden.detach().clone()
    h[5, 3] = float("nan")
    kl = erpd.linear_kl(h, x.weight, x.targets, backend=kl_backend, **teacher)
    assert torch.isnan(kl[5])
    others = torch.arange(37) != 5
    assert torch.equal(kl[others], clean[others])


def test_extreme_logits_stay_finite(kl_backend):
    x = make_linear_inputs(33, 64, 1001, logit_std=300.0, seed=25)  # |z| ~ 1e3
    teacher = make_kl_teacher(x, "fused", closeness=0.5, seed=26)
    for direction in DIRECTIONS:
        kl = erpd.linear_kl(x.hidden, x.weight, x.targets, backend=kl_backend, direction=direction, temperature=0.5, **teacher)
        ref = erpd.reference.linear_kl(x.hidden.double(), x.weight.double(), x.targets, direction=direction, temperature=0.5, **_to64(teacher))
        assert torch.isfinite(kl).all() and (kl >= 0).all()
        torch.testing.assert_close(kl.double(), ref, rtol=1e-4, atol=1e-2)  # KL of size ~1e3


def test_single_row_and_empty_batch(kl_backend):
    x = make_linear_inputs(1, 32, 128, seed=27)
    check_kl(x, make_kl_teacher(x, "fused", seed=28), kl_backend, direction="reverse")
    e = make_linear_inputs(0, 32, 128, seed=29)
    kl = erpd.linear_kl(e.hidden, e.weight, e.targets, backend=kl_backend, **make_kl_teacher(e, "fused", seed=30))
    assert kl.shape == (0,)
    kl.sum().backward()
    assert e.hidden.grad.shape == (0, 32) and (e.weight.grad == 0).all()


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_module_form(kl_backend, reduction):
    x = make_linear_inputs((2, 9), 32, 128, ignore_frac=0.3, seed=31)
    teacher = make_kl_teacher(x, "fused", seed=32)
    mod = erpd.nn.LinearKL(direction="reverse", temperature=0.8, reduction=reduction, backend=kl_backend)
    out = mod(x.hidden, x.weight, x.targets, **teacher)
    per_token = erpd.reference.linear_kl(x.hidden.detach().double(), x.weight.detach().double(), x.targets, direction="reverse", temperature=0.8, **_to64(teacher))
    expected = {"none": per_token, "sum": per_token.sum(), "mean": per_token.sum() / (x.targets != -100).sum()}[reduction]
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    assert "reduction" in repr(mod)
    x.targets[:] = -100
    empty = erpd.nn.LinearKL(reduction="mean", backend=kl_backend)(x.hidden, x.weight, x.targets, **teacher)
    assert empty.item() == 0.0
    empty.backward()
    assert (x.hidden.grad == 0).all()


def test_torch_backend_float64_passthrough():
    x = make_linear_inputs(8, 16, 50, dtype=torch.float64, seed=33)
    kl = erpd.linear_kl(x.hidden, x.weight, x.targets, backend="torch", **make_kl_teacher(x, "dense", seed=34))
    assert kl.dtype == torch.float64


def test_auto_picks_cpu_backend_when_built():
    if not erpd._ext.has_cpu():
        pytest.skip("erpd._C not built")
    assert erpd.backends.resolve("auto", torch.device("cpu"), "linear_kl") == "cpu"


# --------------------------------------------------------------------------------------------
# Cross-check with Liger-Kernel's fused linear JSD (its Triton JSD kernel runs under the
# interpreter here): beta 0 and 1 are its forward and reverse KL; its loss is the sum over
# non-ignored tokens divided by their count, i.e. LinearKL(reduction="mean").
# --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # Liger's masked -inf lanes
@pytest.mark.parametrize("beta,direction", [(0.0, "forward"), (1.0, "reverse"), (0.5, "jsd")])
def test_matches_liger_fused_linear_jsd(kl_backend, beta, direction):
    liger = pytest.importorskip("liger_kernel.transformers.fused_linear_jsd")
    if not (torch.cuda.is_available() or erpd.backends.triton_interpreting()):
        pytest.skip("Liger's JSD kernel needs CUDA or the Triton interpreter")
    x = make_linear_inputs(24, 32, 300, ignore_frac=0.2, seed=35)
    teacher = make_kl_teacher(x, "fused", h=40, seed=36)
    ours = erpd.nn.LinearKL(direction=direction, beta=beta, temperature=0.9, reduction="mean", backend=kl_backend)(
        x.hidden, x.weight, x.targets, **teacher
    )
    ours.backward()
    y = x.clone()
    theirs = liger.LigerFusedLinearJSD(jsd_beta=beta, temperature=0.9)(
        y.hidden, y.weight, teacher["teacher_hidden"], teacher["teacher_weight"], y.targets
    )
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(x.hidden.grad, y.hidden.grad, rtol=2e-3, atol=1e-5)
    torch.testing.assert_close(x.weight.grad, y.weight.grad, rtol=2e-3, atol=1e-5)


# --------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("form,direction", [("fused", "forward"), ("fused", "reverse"), ("fused", "jsd"), ("dense", "forward"), ("topk", "forward")], ids=str)
def test_gpu_backends(backend, dtype, form, direction):
    if backend not in erpd.available("cuda", op="linear_kl"):
        pytest.skip(f"{backend} not available on CUDA here")
    x = make_linear_inputs(1024, 1024, 32000, bias=True, ignore_frac=0.2, dtype=dtype, device="cuda", seed=43)
    check_kl(x, make_kl_teacher(x, form, h=768, seed=44), backend, direction=direction, beta=0.3, temperature=0.8)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_peak_memory_is_far_below_naive(backend):
    if backend not in erpd.available("cuda", op="linear_kl"):
        pytest.skip(f"{backend} not available on CUDA here")

    def peak(fn):
        x = make_linear_inputs(4096, 1024, 128256, dtype=torch.bfloat16, device="cuda", seed=47)
        teacher = make_kl_teacher(x, "fused", seed=48)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn(x, teacher).sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    naive = peak(lambda x, t: naive_linear_kl(x.hidden, x.weight, x.targets, **t))
    fused = peak(lambda x, t: erpd.linear_kl(x.hidden, x.weight, x.targets, backend=backend, **t))
    assert fused < 0.25 * naive, f"{backend}: {fused / 2**20:.0f} MB vs naive {naive / 2**20:.0f} MB"


@pytest.mark.parametrize("form", ["fused", "dense"])
def test_cpu_gemms_split_between_threads(split_gemms, form):
    """Every GEMM split between two threads (the split_gemms fixture)."""
    split_gemms(buffers=2)
    x = make_linear_inputs(600, 32, 1100, bias=True, ignore_frac=0.2, seed=62)
    for direction in DIRECTIONS:
        check_kl(x.clone(), make_kl_teacher(x, form, h=24, bias=True, seed=63), "cpu", direction=direction, beta=0.4,
                 temperature=0.7)
