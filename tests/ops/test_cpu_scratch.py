"""The logits blocks the cpu backend keeps between calls (csrc/common/chunked.h, ScratchPool):
kept blocks change no result, no output aliases one, two blocks in use at once are distinct
(linear_kl's student and teacher), and erpd.release_cpu_scratch frees what no call uses."""

import pytest
import torch

import erpd
from erpd import _ext
from erpd.testing import make_kl_teacher, make_linear_inputs

pytestmark = pytest.mark.skipif(not _ext.has_cpu(), reason="erpd._C not built")


def _kl_loss(x, teacher):
    y = x.clone()
    loss = erpd.linear_kl(y.hidden, y.weight, y.targets, bias=y.bias, backend="cpu", reduction="mean", **teacher)
    loss.backward()
    return loss.detach(), y.hidden.grad, y.weight.grad


def _logprobs(x):
    lp, ent = erpd.linear_logprobs(x.hidden.detach(), x.weight.detach(), x.targets, with_entropy=True, backend="cpu")
    return lp, ent


def test_kept_blocks_change_nothing(monkeypatch):
    x = make_linear_inputs(300, 32, 1100, bias=True, ignore_frac=0.2, seed=71)
    teacher = make_kl_teacher(x, "fused", h=24, bias=True, seed=72)
    erpd.release_cpu_scratch()
    first = _kl_loss(x, teacher)  # fresh blocks, kept
    assert _ext.cpu_scratch_bytes() >= 2 * 300 * 1100 * 4  # student and teacher: two blocks
    kept_lp = _logprobs(x)  # reuses a kept block
    again = _kl_loss(x, teacher)
    monkeypatch.setenv("ERPD_CPU_SCRATCH", "0")
    fresh = _kl_loss(x, teacher)
    fresh_lp = _logprobs(x)
    for a, b, c in zip(first, again, fresh):
        assert torch.equal(a, b) and torch.equal(a, c)
    for a, b in zip(kept_lp, fresh_lp):
        assert torch.equal(a, b)
    # The first call's outputs did not change when later calls reused its blocks.
    assert torch.equal(first[0], fresh[0]) and torch.equal(first[2], fresh[2])


def test_release():
    x = make_linear_inputs(64, 16, 700, seed=73)
    _logprobs(x)
    held = _ext.cpu_scratch_bytes()
    assert held >= 64 * 700 * 4
    assert erpd.release_cpu_scratch() == held
    assert _ext.cpu_scratch_bytes() == 0 and erpd.release_cpu_scratch() == 0
    torch.testing.assert_close(_logprobs(x)[0], erpd.linear_logprobs(x.hidden, x.weight, x.targets, backend="torch")[0])
