"""linear_logprobs rejects bad input with a clear error that names the argument."""

import os
import subprocess
import sys

import pytest
import torch

import erpd
from erpd.testing import make_linear_inputs


@pytest.fixture
def x():
    return make_linear_inputs(6, 8, 11, bias=True, seed=0, requires_grad=False)


def call(x, **kw):
    args = dict(hidden=x.hidden, weight=x.weight, targets=x.targets, bias=x.bias)
    args.update(kw)
    h, w, t = args.pop("hidden"), args.pop("weight"), args.pop("targets")
    return erpd.linear_logprobs(h, w, t, **args)


@pytest.mark.parametrize(
    "change, exc, words",
    [
        (dict(hidden=torch.randn(6, 9)), ValueError, "hidden size 9"),
        (dict(weight=torch.randn(11, 8, 1)), ValueError, "weight must have shape [V, H]"),
        (dict(weight=torch.randn(0, 8)), ValueError, "empty vocabulary"),
        (dict(hidden=torch.tensor(1.0)), ValueError, "hidden must have shape"),
        (dict(targets=torch.zeros(5, dtype=torch.long)), ValueError, "targets shape"),
        (dict(weight=torch.randn(11, 8, dtype=torch.float64)), TypeError, "weight dtype"),
        (dict(bias=torch.randn(11, dtype=torch.float16)), TypeError, "bias dtype"),
        (dict(bias=torch.randn(10)), ValueError, "bias must have shape [11]"),
        (dict(hidden=torch.ones(6, 8, dtype=torch.int64), weight=torch.ones(11, 8, dtype=torch.int64), bias=None), TypeError, "hidden must be a floating"),
        (dict(targets=torch.zeros(6)), TypeError, "targets must be an integer"),
        (dict(targets=torch.zeros(6, dtype=torch.bool)), TypeError, "targets must be an integer"),
        (dict(targets=torch.tensor([0, 1, 2, 3, 4, 11])), ValueError, "found 11"),
        (dict(targets=torch.tensor([0, 1, 2, 3, 4, -1])), ValueError, "found -1"),
        (dict(hidden=[[0.0] * 8] * 6), TypeError, "hidden must be a torch.Tensor"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(temperature="1"), TypeError, "temperature"),
        (dict(ignore_index=True), TypeError, "ignore_index"),
        (dict(ignore_index=1.5), TypeError, "ignore_index"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
        (dict(weight=torch.randn(11, 8, device="meta"), bias=None), ValueError, "weight is on meta"),
        (dict(targets=torch.zeros(6, dtype=torch.long, device="meta")), ValueError, "targets is on meta"),
        (dict(bias=torch.randn(11, device="meta")), ValueError, "bias is on meta"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input(x, change, exc, words):
    with pytest.raises(exc) as info:
        call(x, **change)
    assert words in str(info.value)


def test_ignore_index_target_is_not_out_of_range(x):
    t = x.targets.clone()
    t[0] = -100
    lp, _ = call(x, targets=t)
    assert lp[0] == 0


def test_value_checks_can_be_skipped_explicitly(x):
    # validate=False is the CUDA default (no host sync); on CPU it must still not be needed for
    # in-range targets, and the shape checks still run.
    lp, _ = call(x, validate=False, backend="torch")
    assert lp.shape == (6,)
    with pytest.raises(ValueError, match="targets shape"):
        call(x, validate=False, targets=torch.zeros(5, dtype=torch.long))


def test_explicit_backend_that_cannot_run_raises(x):
    with pytest.raises(erpd.BackendUnavailableError, match="needs CUDA tensors"):
        call(x, backend="cuda")


def test_fused_backends_reject_float64(cpu_backend):
    y = make_linear_inputs(4, 8, 11, dtype=torch.float64, seed=1)
    with pytest.raises(TypeError, match="float64 runs only on backend='torch'"):
        erpd.linear_logprobs(y.hidden, y.weight, y.targets, backend=cpu_backend)


def test_triton_on_cpu_without_interpreter_raises():
    code = (
        "import torch, erpd\n"
        "from erpd.testing import make_linear_inputs\n"
        "x = make_linear_inputs(4, 8, 11, seed=0)\n"
        "try:\n"
        "    erpd.linear_logprobs(x.hidden, x.weight, x.targets, backend='triton')\n"
        "except erpd.BackendUnavailableError as e:\n"
        "    print('raised:', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "raised:" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr
