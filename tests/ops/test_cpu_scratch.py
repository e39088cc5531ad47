"""The logits blocks the cpu backend keeps between calls (csrc/common/chunked.h, ScratchPool;
blocks of 32 MiB and more): kept blocks change no result, no output aliases one, two blocks in
use at once are distinct (linear_kl's student and teacher), smaller blocks are not kept, and
erpd.release_cpu_scratch frees what no call uses."""

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


N, V = 2048, 4096  # one fp32 [N, V] block: 32 MiB, the smallest kept


def test_kept_blocks_change_nothing(monkeypatch):
    x = make_linear_inputs(N, 16, V, bias=True, ignore_frac=0.2, seed=71)
    teacher = make_kl_teacher(x, "fused", h=12, bias=True, seed=72)
    erpd.release_cpu_scratch()
    first = _kl_loss(x, teacher)  # fresh blocks, kept
    assert _ext.cpu_scratch_bytes() == 2 * N * V * 4  # student and teacher: two blocks
    kept_lp = erpd.linear_token_stats(x.hidden.detach(), x.weight.detach(), x.targets, backend="cpu")  # whole rows
    assert _ext.cpu_scratch_bytes() == 2 * N * V * 4
    again = _kl_loss(x, teacher)
    monkeypatch.setenv("ERPD_CPU_SCRATCH", "0")
    fresh = _kl_loss(x, teacher)
    fresh_lp = erpd.linear_token_stats(x.hidden.detach(), x.weight.detach(), x.targets, backend="cpu")
    # Equal bits, and the first call's outputs did not change when later calls reused its blocks.
    for a, b, c in zip(first, again, fresh):
        assert torch.equal(a, b) and torch.equal(a, c)
    for a, b in zip(kept_lp, fresh_lp):
        assert torch.equal(a, b)


def test_release_and_small_blocks():
    x = make_linear_inputs(N, 16, V, seed=73)
    erpd.release_cpu_scratch()
    _kl_loss(x, make_kl_teacher(x, "fused", h=12, seed=74))
    held = _ext.cpu_scratch_bytes()
    assert held == 2 * N * V * 4
    assert erpd.release_cpu_scratch() == held
    assert _ext.cpu_scratch_bytes() == 0 and erpd.release_cpu_scratch() == 0
    # The per-token ops' vocabulary blocks (16 MiB in all) are not kept.
    lp, _ = _logprobs(x)
    assert _ext.cpu_scratch_bytes() == 0
    torch.testing.assert_close(lp, erpd.linear_logprobs(x.hidden, x.weight, x.targets, backend="torch")[0])
