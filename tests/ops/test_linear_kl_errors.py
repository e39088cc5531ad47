"""linear_kl rejects bad input with a clear error that names the argument (the student's own
arguments share linear_logprobs' checks, tested in test_linear_logprobs_errors.py)."""

import pytest
import torch

import erpd
from erpd.testing import make_kl_teacher, make_linear_inputs

N, H, V = 6, 8, 11


@pytest.fixture
def x():
    return make_linear_inputs(N, H, V, bias=True, seed=0, requires_grad=False)


def call(x, **kw):
    args = dict(hidden=x.hidden, weight=x.weight, targets=x.targets, bias=x.bias)
    if not any(k.startswith("teacher_") for k in kw):
        args.update(make_kl_teacher(x, "fused", h=5, seed=1))
    args.update(kw)
    h, w, t = args.pop("hidden"), args.pop("weight"), args.pop("targets")
    return erpd.linear_kl(h, w, t, **args)


def topk(k=3, **change):
    logp, ids = torch.randn(N, V).log_softmax(-1).topk(k)
    return (change.get("logp", logp), change.get("ids", ids))


@pytest.mark.parametrize(
    "change, exc, words",
    [
        (dict(teacher_hidden=None, teacher_weight=None), ValueError, "exactly one teacher"),
        (dict(teacher_hidden=torch.randn(N, 5), teacher_weight=torch.randn(V, 5), teacher_logits=torch.randn(N, V)), ValueError, "exactly one teacher"),
        (dict(teacher_hidden=torch.randn(N, 5)), ValueError, "needs both teacher_hidden"),
        (dict(teacher_weight=torch.randn(V, 5)), ValueError, "needs both teacher_hidden"),
        (dict(teacher_hidden=torch.randn(N, 5), teacher_weight=torch.randn(V + 1, 5)), ValueError, "share a vocabulary"),
        (dict(teacher_hidden=torch.randn(N, 5), teacher_weight=torch.randn(V, 4)), ValueError, "teacher_hidden has hidden size 5"),
        (dict(teacher_hidden=torch.randn(N - 1, 5), teacher_weight=torch.randn(V, 5)), ValueError, "teacher_hidden has shape"),
        (dict(teacher_hidden=torch.randn(N, 5, dtype=torch.float64), teacher_weight=torch.randn(V, 5, dtype=torch.float64)), TypeError, "teacher_hidden dtype"),
        (dict(teacher_hidden=torch.randn(N, 5), teacher_weight=torch.randn(V, 5), teacher_bias=torch.randn(V - 1)), ValueError, "teacher_bias must have shape"),
        (dict(teacher_logits=torch.randn(N, V), teacher_bias=torch.randn(V)), ValueError, "teacher_bias goes with"),
        (dict(teacher_logits=torch.randn(N, V + 2)), ValueError, "teacher_logits has vocabulary 13"),
        (dict(teacher_logits=torch.randn(N + 1, V)), ValueError, "teacher_logits has shape"),
        (dict(teacher_logits=torch.ones(N, V, dtype=torch.long)), TypeError, "teacher_logits must be a floating"),
        (dict(teacher_logits=torch.randn(N, V, device="meta")), ValueError, "teacher_logits is on meta"),
        (dict(teacher_topk=torch.randn(N, 3)), TypeError, "pair"),
        (dict(teacher_topk=topk(ids=torch.zeros(N, 3))), TypeError, "ids must be an integer"),
        (dict(teacher_topk=topk(ids=torch.zeros(N, 2, dtype=torch.long))), ValueError, "ids shape"),
        (dict(teacher_topk=topk(ids=torch.full((N, 3), V))), ValueError, "ids must be in [0, 11)"),
        (dict(teacher_topk=topk(ids=torch.zeros(N, 3, dtype=torch.long))), ValueError, "distinct"),
        (dict(teacher_topk=topk(logp=torch.full((N, 3), 0.5))), ValueError, "log-probabilities"),
        (dict(teacher_topk=topk(logp=torch.full((N, 3), -0.1))), ValueError, "sum to more than 1"),
        (dict(teacher_topk=(torch.zeros(N, 0), torch.zeros(N, 0, dtype=torch.long))), ValueError, "1 <= k"),
        (dict(teacher_topk=topk(), direction="reverse"), ValueError, "direction='forward' only"),
        (dict(teacher_topk=topk(), direction="jsd"), ValueError, "direction='forward' only"),
        (dict(direction="backward"), ValueError, "direction must be one of"),
        (dict(beta=1.5), ValueError, "beta must be in [0, 1]"),
        (dict(beta="0.5"), TypeError, "beta must be a real number"),
        (dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
        (dict(targets=torch.tensor([0, 1, 2, 3, 4, V])), ValueError, "found 11"),
        (dict(targets=torch.zeros(N - 1, dtype=torch.long)), ValueError, "targets shape"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input_raises_clear_error(x, change, exc, words):
    with pytest.raises(exc) as info:
        call(x, **change)
    assert words in str(info.value), str(info.value)


def test_unavailable_backend_raises_instead_of_falling_back(x):
    with pytest.raises(erpd.BackendUnavailableError, match="backend='cuda' needs CUDA tensors"):
        call(x, backend="cuda")


def test_float64_on_a_fused_backend_says_to_use_torch():
    x = make_linear_inputs(N, H, V, dtype=torch.float64, seed=2, requires_grad=False)
    if not erpd._ext.has_cpu():
        pytest.skip("erpd._C not built")
    with pytest.raises(TypeError, match="float64 runs only on backend='torch'"):
        call(x, backend="cpu")
