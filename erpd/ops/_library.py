"""The kernels of every backend behind one lookup, `impl(backend, name)`, and what their
`torch.library` registration shares, so that `torch.compile(fullgraph=True)` traces through every
op. Each op registers its own kernels (``erpd/ops/<op>/library.py``: fakes and Triton custom ops;
``erpd/ops/<op>/torch_kernels.py``: the `torch` backend) through `register_fake`,
`register_triton` and `register_torch` below.

Three families of kernels share one contract per kernel name (the schemas of csrc/bindings.cpp):

* ``torch.ops.erpd.*``: the C++/CUDA kernels of `erpd._C` (CPU and CUDA dispatch keys). Here
  they get *fake* (meta) implementations, which give the output shapes and dtypes from the
  inputs' alone, so that dynamo and AOTAutograd can trace a graph around them without running
  them.
* ``torch.ops.erpd_triton.*``: the Triton launchers of `erpd.kernels`, wrapped as opaque
  `torch.library.custom_op`s with the same fakes. Opaque on purpose: a `triton_op` would let
  Inductor inline the kernels, but it needs a real GPU Triton backend to compile them, while the
  interpreter (TRITON_INTERPRET=1, our CPU path) only runs them eagerly. The launchers are
  imported inside the op bodies, so importing erpd never imports Triton (which must happen
  after TRITON_INTERPRET is set).
* the `torch` backend's kernels: plain PyTorch functions of the same signatures.

Autograd stays in the `torch.autograd.Function`s of erpd/ops/<op>/function.py, which call these ops; dynamo
traces those Functions (forward and backward) into the graph. None of the ops is registered
with an autograd formula of its own: each op's backward is its `*_bwd` op (or, for the policy
losses, gradients the forward already returned).

The fakes must agree with the kernels exactly (``torch.library.opcheck`` in
tests/ops/test_compile.py checks it). Gradient outputs that are not requested come back as empty
1-D tensors, in the same dtype as when they are requested.

Note: no `from __future__ import annotations` here: `custom_op` infers each schema from the
annotations, which must be real types.
"""

from typing import Optional

import torch
from torch import Tensor

from erpd import _ext
from erpd.ops import policy_spec

NUM_POLICY_STATS = policy_spec.NUM_STATS

# Every kernel contract of erpd._C (its schemas are declared in csrc/bindings.cpp).
CPP_OPS = ("linear_logprobs_fwd", "linear_logprobs_bwd", "linear_kl_fwd", "linear_kl_bwd", "linear_kl_fwd_with_grads",
           "policy_loss_fwd", "linear_policy_loss_fwd")
# The Triton ops: linear_policy_loss and linear_kl's reductions have no Triton op of their own
# (they compose the others).
TRITON_OPS = ("linear_logprobs_fwd", "linear_logprobs_bwd", "linear_kl_fwd", "linear_kl_bwd", "policy_loss_fwd")

FAKES: dict = {}
_TORCH: dict = {}
NO_MUTATION = ()


# --------------------------------------------------------------------------------------------
# What the ops' fakes share: one fake per kernel contract, for the C++ and the Triton op of it
# --------------------------------------------------------------------------------------------


def row_stats(hidden: Tensor, k: int) -> tuple:
    return tuple(hidden.new_empty(hidden.shape[0], dtype=torch.float32) for _ in range(k))


def grads(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], need_h: bool, need_w: bool) -> tuple:
    gh = hidden.new_empty(hidden.shape) if need_h else hidden.new_empty(0)
    gw = weight.new_empty(weight.shape) if need_w else weight.new_empty(0)
    gb = hidden.new_empty(weight.shape[0] if bias is not None else 0, dtype=torch.float32)
    return gh, gw, gb


def register_fake(name: str, fake) -> None:
    """The fake of kernel contract `name`, for the erpd._C op of that name (when built)."""
    FAKES[name] = fake
    if (_ext.has_cpu() or _ext.has_cuda()) and hasattr(torch.ops.erpd, name):
        torch.library.register_fake(f"erpd::{name}")(fake)


def register_triton(op) -> None:
    """A Triton launcher wrapped as `erpd_triton::<name>` (a `custom_op`), given the contract's fake."""
    op.register_fake(FAKES[op._name])


def register_torch(name: str, fn) -> None:
    """The `torch` backend's kernel of contract `name`."""
    _TORCH[name] = fn


def impl(backend: str, name: str):
    """The kernel of `backend` ("torch", "triton", "cpu" or "cuda") for contract `name`."""
    if backend == "torch":
        return _TORCH[name]
    if backend == "triton":
        return getattr(torch.ops.erpd_triton, name)
    if backend in ("cpu", "cuda"):
        return getattr(torch.ops.erpd, name)
    raise AssertionError(backend)
