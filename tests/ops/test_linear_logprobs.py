"""linear_logprobs: every backend against the float64 reference, forward and backward.

Tolerance rule (docs/design.md §5): error vs float64 at most 2x the error plain PyTorch makes on the
same inputs in the same precision (erpd.testing.assert_within_rule).
"""

import math

import pytest
import torch

import erpd
from erpd.testing import assert_within_rule, make_linear_inputs, naive_linear_logprobs, shapes, three_way
from erpd.testing.shapes import by_name

# oddv (V = 4099) costs seconds per case under the Triton interpreter: the slow tier.
INTERP_SHAPES = [pytest.param(s, marks=pytest.mark.slow) if s.name == "oddv" else s for s in shapes("interp")]


def _run(x, backend, temperature=1.0, ignore_index=-100, with_entropy=True, g=None):
    """Forward + backward of one provider on fresh leaves; returns outputs and grads."""
    if backend == "naive":
        lp, ent = naive_linear_logprobs(x.hidden, x.weight, x.targets, bias=x.bias, temperature=temperature, ignore_index=ignore_index)
        ent = ent if with_entropy else None
    else:
        lp, ent = erpd.linear_logprobs(
            x.hidden, x.weight, x.targets, bias=x.bias, temperature=temperature,
            ignore_index=ignore_index, with_entropy=with_entropy, backend=backend,
        )
    g_lp, g_ent = g
    loss = (lp * g_lp.to(lp.device, lp.dtype)).sum()
    if with_entropy:
        loss = loss + (ent * g_ent.to(ent.device, ent.dtype)).sum()
    loss.backward()
    grads = {k: getattr(x, k).grad for k in ("hidden", "weight", "bias") if getattr(x, k) is not None and getattr(x, k).requires_grad}
    return lp.detach(), (None if ent is None else ent.detach()), grads


def check_backend(x, backend, *, temperature=1.0, ignore_index=-100, with_entropy=True, seed=0):
    """Compare `backend` with the float64 reference under the tolerance rule; returns its outputs."""
    gen = torch.Generator().manual_seed(seed + 17)
    lead = x.targets.shape
    # Upstream gradients != 1 on both outputs.
    g = (torch.randn(lead, generator=gen, dtype=torch.float64) * 2, torch.randn(lead, generator=gen, dtype=torch.float64))
    ref, base, got = three_way(lambda y, provider: _run(y, provider, temperature, ignore_index, with_entropy, g),
                               backend, exact=x.to64, fresh=x.clone)
    assert got[0].dtype == torch.float32
    assert_within_rule(got[0], ref[0], base[0], name=f"{backend} logprobs")
    if with_entropy:
        assert got[1].dtype == torch.float32
        assert_within_rule(got[1], ref[1], base[1], name=f"{backend} entropy")
    else:
        assert got[1] is None
    for k in ref[2]:
        assert got[2][k].dtype == getattr(x, k).dtype, f"grad of {k} has dtype {got[2][k].dtype}"
        assert_within_rule(got[2][k], ref[2][k], base[2][k], name=f"{backend} d{k}")
    return got


@pytest.mark.parametrize("shape", INTERP_SHAPES, ids=lambda s: s.id)
@pytest.mark.parametrize("bias", [False, True])
def test_interp_shapes(cpu_backend, shape, bias):
    x = make_linear_inputs(shape.n, shape.h, shape.v, bias=bias, ignore_frac=0.2, seed=shape.n + bias)
    check_backend(x, cpu_backend, seed=shape.v)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_temperature(cpu_backend, temperature):
    s = by_name("odd")
    x = make_linear_inputs(s.n, s.h, s.v, bias=True, ignore_frac=0.2, seed=3)
    check_backend(x, cpu_backend, temperature=temperature)


# Under the Triton interpreter the 49152-entry vocabulary takes tens of seconds: the slow tier.
@pytest.mark.parametrize(
    "cpu_backend", [pytest.param(b, marks=pytest.mark.slow) if b == "triton" else b for b in erpd.available("cpu") if b != "torch"]
)
def test_realistic_vocab(cpu_backend):
    s = by_name("smollm-vocab")
    # The interpreter pays per tile: keep its rows few on the 49152-entry vocabulary.
    n = 16 if cpu_backend == "triton" else s.n
    x = make_linear_inputs(n, s.h, s.v, ignore_frac=0.2, seed=5)
    check_backend(x, cpu_backend, temperature=0.9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_inputs(cpu_backend, dtype):
    s = by_name("odd")
    x = make_linear_inputs(s.n, s.h, s.v, bias=True, ignore_frac=0.2, dtype=dtype, seed=7)
    check_backend(x, cpu_backend)


def test_leading_dims_and_custom_ignore_index(cpu_backend):
    x = make_linear_inputs((3, 13), 64, 1001, seed=11)
    x.targets[0, :4] = 7  # ignore_index inside [0, V): those rows are ignored, others with 7 too
    lp, ent, grads = check_backend(x, cpu_backend, ignore_index=7)
    assert lp.shape == (3, 13) and ent.shape == (3, 13)
    assert (lp[x.targets == 7] == 0).all() and (ent[x.targets == 7] == 0).all()


def test_non_contiguous_hidden(cpu_backend):
    base = make_linear_inputs(40, 96, 1001, seed=13)
    # A strided view: every other row of a [2N, H] buffer, and transposed storage.
    buf = torch.randn(96, 80).t()  # [80, 96], non-contiguous
    hidden = buf[::2].detach().requires_grad_()
    assert not hidden.is_contiguous()
    x = type(base)(hidden, base.weight, base.targets, None)
    check_backend(x, cpu_backend, seed=13)


def test_logprob_only_and_frozen_head(cpu_backend):
    x = make_linear_inputs(37, 96, 1001, ignore_frac=0.2, seed=17)
    x.weight.requires_grad_(False)
    _, ent, grads = check_backend(x, cpu_backend, with_entropy=False)
    assert ent is None and set(grads) == {"hidden"}
    y = make_linear_inputs(37, 96, 1001, ignore_frac=0.2, seed=18)
    y.hidden.requires_grad_(False)
    _, _, grads = check_backend(y, cpu_backend)
    assert set(grads) == {"weight"}


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 4 * 1001])
def test_chunk_boundaries_of_the_cpp_driver(monkeypatch, chunk_bytes):
    """The C++ driver splits rows and vocabulary by a logits byte budget (ERPD_CHUNK_BYTES, read
    per call; csrc/common/chunked.h cpu_blocks): blocks of one row and 256 columns, and 11-row blocks of
    256 columns, ragged in both directions (V = 1001), must match the reference."""
    if not erpd._ext.has_cpu():
        pytest.skip("erpd._C not built")
    monkeypatch.setenv("ERPD_CHUNK_BYTES", str(chunk_bytes))
    x = make_linear_inputs(37, 96, 1001, bias=True, ignore_frac=0.2, seed=53)
    check_backend(x, "cpu", temperature=0.7)


def test_all_rows_ignored(cpu_backend):
    x = make_linear_inputs(20, 32, 128, bias=True, seed=19)
    x.targets[:] = -100
    lp, ent = erpd.linear_logprobs(x.hidden, x.weight, x.targets, bias=x.bias, with_entropy=True, backend=cpu_backend)
    assert (lp == 0).all() and (ent == 0).all()
    (lp * 3 + ent * 2).sum().backward()
    for t in (x.hidden, x.weight, x.bias):
        assert (t.grad == 0).all()


def test_invariants_and_extreme_logits(cpu_backend):
    x = make_linear_inputs(33, 64, 1001, logit_std=300.0, seed=23)  # |z| ~ 1e3
    lp, ent = erpd.linear_logprobs(x.hidden, x.weight, x.targets, with_entropy=True, backend=cpu_backend, temperature=0.5)
    ref_lp, ref_ent = erpd.reference.linear_logprobs(x.hidden.double(), x.weight.double(), x.targets, temperature=0.5, with_entropy=True)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert (lp <= 0).all() and (ent >= 0).all() and (ent <= math.log(1001) + 1e-5).all()
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=1e-2)  # |lp| up to ~1e4
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-4, atol=1e-4)


def test_nan_row_stays_in_its_row(cpu_backend):
    x = make_linear_inputs(37, 64, 1001, seed=29)
    clean_lp, clean_ent = erpd.linear_logprobs(x.hidden, x.weight, x.targets, with_entropy=True, backend=cpu_backend)
    h = x.hidden.detach().clone()
    h[5, 3] = float("nan")
    lp, ent = erpd.linear_logprobs(h, x.weight, x.targets, with_entropy=True, backend=cpu_backend)
    assert torch.isnan(lp[5]) and torch.isnan(ent[5])
    others = torch.arange(37) != 5
    assert torch.equal(lp[others], clean_lp[others]) and torch.equal(ent[others], clean_ent[others])


def test_single_row_and_empty_batch(cpu_backend):
    x = make_linear_inputs(1, 32, 128, seed=31)
    check_backend(x, cpu_backend)
    e = make_linear_inputs(0, 32, 128, seed=31)
    lp, ent = erpd.linear_logprobs(e.hidden, e.weight, e.targets, with_entropy=True, backend=cpu_backend)
    assert lp.shape == (0,) and ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert e.hidden.grad.shape == (0, 32) and (e.weight.grad == 0).all()


def test_module_form(cpu_backend):
    x = make_linear_inputs((2, 9), 32, 128, ignore_frac=0.2, seed=37)
    mod = erpd.nn.LinearLogprobs(temperature=0.8, with_entropy=True, backend=cpu_backend)
    lp, ent = mod(x.hidden, x.weight, x.targets)
    ref_lp, ref_ent = erpd.linear_logprobs(x.hidden, x.weight, x.targets, temperature=0.8, with_entropy=True, backend="torch")
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    assert "temperature=0.8" in repr(mod)


def test_torch_backend_float64_passthrough():
    x = make_linear_inputs(8, 16, 50, dtype=torch.float64, seed=41)
    lp, ent = erpd.linear_logprobs(x.hidden, x.weight, x.targets, with_entropy=True, backend="torch")
    assert lp.dtype == torch.float64 and ent.dtype == torch.float64


def test_auto_picks_cpu_backend_when_built():
    if not erpd._ext.has_cpu():
        pytest.skip("erpd._C not built")
    assert erpd.backends.resolve("auto", torch.device("cpu"), "linear_logprobs") == "cpu"


# --------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_backends(backend, dtype):
    if backend not in erpd.available("cuda"):
        pytest.skip(f"{backend} not available on CUDA here")
    x = make_linear_inputs(1024, 1024, 32000, bias=True, ignore_frac=0.2, dtype=dtype, device="cuda", seed=43)
    check_backend(x, backend, temperature=0.8)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_peak_memory_is_far_below_naive(backend):
    if backend not in erpd.available("cuda"):
        pytest.skip(f"{backend} not available on CUDA here")

    def peak(fn):
        x = make_linear_inputs(4096, 1024, 128256, dtype=torch.bfloat16, device="cuda", seed=47)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        lp, ent = fn(x)
        (lp.sum() + ent.sum()).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    naive = peak(lambda x: naive_linear_logprobs(x.hidden, x.weight, x.targets))
    fused = peak(lambda x: erpd.linear_logprobs(x.hidden, x.weight, x.targets, with_entropy=True, backend=backend))
    assert fused < 0.25 * naive, f"{backend}: {fused / 2**20:.0f} MB vs naive {naive / 2**20:.0f} MB"


def test_cpu_gemms_split_between_threads(split_gemms):
    """Every GEMM split between two threads (the split_gemms fixture)."""
    split_gemms(buffers=1)
    x = make_linear_inputs(600, 32, 1100, bias=True, ignore_frac=0.2, seed=61)
    check_backend(x, "cpu", temperature=0.7)
