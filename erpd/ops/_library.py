"""torch.library registration of the fused kernels, so that `torch.compile(fullgraph=True)` traces
through every op.

Two families of ops share one contract per kernel (the schemas of csrc/bindings.cpp):

* ``torch.ops.erpd.*``: the C++/CUDA kernels of `erpd._C` (CPU and CUDA dispatch keys). Here
  they get *fake* (meta) implementations, which give the output shapes and dtypes from the
  inputs' alone, so that dynamo and AOTAutograd can trace a graph around them without running
  them.
* ``torch.ops.erpd_triton.*``: the Triton launchers of `erpd.kernels`, wrapped as opaque
  `torch.library.custom_op`s with the same fakes. Opaque on purpose: a `triton_op` would let
  Inductor inline the kernels, but it needs a real GPU Triton backend to compile them, while the
  interpreter (TRITON_INTERPRET=1, our CPU path) only runs them eagerly. The launchers are
  imported inside the op bodies, so importing this module never imports Triton (which must
  happen after TRITON_INTERPRET is set).

Autograd stays in the `torch.autograd.Function`s of erpd/ops/*.py, which call these ops; dynamo
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


# --------------------------------------------------------------------------------------------
# fakes: one per kernel contract, shared by the C++ and the Triton op of that contract
# --------------------------------------------------------------------------------------------


def _row_stats(hidden: Tensor, k: int) -> tuple:
    return tuple(hidden.new_empty(hidden.shape[0], dtype=torch.float32) for _ in range(k))


def _grads(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], need_h: bool, need_w: bool) -> tuple:
    gh = hidden.new_empty(hidden.shape) if need_h else hidden.new_empty(0)
    gw = weight.new_empty(weight.shape) if need_w else weight.new_empty(0)
    gb = hidden.new_empty(weight.shape[0] if bias is not None else 0, dtype=torch.float32)
    return gh, gw, gb


def _linear_logprobs_fwd_fake(hidden, weight, bias, targets, inv_temperature, softcap_scale, ignore_index, with_stats):
    stats = hidden.new_empty((3, hidden.shape[0]) if with_stats else (0,), dtype=torch.float32)
    return (*_row_stats(hidden, 3), stats)


def _linear_logprobs_bwd_fake(hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy,
                              inv_temperature, softcap_scale, ignore_index, need_grad_hidden, need_grad_weight):
    return _grads(hidden, weight, bias, need_grad_hidden, need_grad_weight)


def _linear_kl_fwd_fake(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
                        targets, inv_temperature, ignore_index, mode, beta):
    return _row_stats(hidden, 4)


def _linear_kl_bwd_fake(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
                        targets, lse_s, lse_t, aux, grad_kl, inv_temperature, ignore_index, mode, beta,
                        need_grad_hidden, need_grad_weight):
    return _grads(hidden, weight, bias, need_grad_hidden, need_grad_weight)


def _linear_kl_fwd_with_grads_fake(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                                   teacher_logits, targets, grad_kl, inv_temperature, ignore_index, mode, beta,
                                   need_grad_hidden, need_grad_weight):
    return (*_row_stats(hidden, 1), *_grads(hidden, weight, bias, need_grad_hidden, need_grad_weight))


def _policy_loss_fwd_fake(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, num_items,
                          method, agg, ratio_lo, ratio_hi, dual_clip, tau_pos, tau_neg, kl_coef, kl_estimator,
                          entropy_coef, num_items_value, norm_scale, kl_ratio_weighted, need_grad_entropy):
    f32 = dict(dtype=torch.float32)
    return (
        logprobs.new_empty((), **f32),
        logprobs.new_empty(NUM_POLICY_STATS, **f32),
        logprobs.new_empty(logprobs.shape, **f32),
        logprobs.new_empty(logprobs.shape if need_grad_entropy else (0,), **f32),
    )


def _linear_policy_loss_fwd_fake(hidden, weight, bias, targets, inv_temperature, softcap_scale, ignore_index,
                                 old_logprobs, advantages, mask, ref_logprobs, is_weights, num_items, method, agg,
                                 ratio_lo, ratio_hi, dual_clip, tau_pos, tau_neg, kl_coef, kl_estimator, entropy_coef,
                                 num_items_value, norm_scale, kl_ratio_weighted, need_grad_hidden, need_grad_weight):
    f32 = dict(dtype=torch.float32)
    return (
        hidden.new_empty((), **f32),
        hidden.new_empty(NUM_POLICY_STATS, **f32),
        *_grads(hidden, weight, bias, need_grad_hidden, need_grad_weight),
        hidden.new_empty(hidden.shape[0], **f32),
    )


FAKES = {
    "linear_logprobs_fwd": _linear_logprobs_fwd_fake,
    "linear_logprobs_bwd": _linear_logprobs_bwd_fake,
    "linear_kl_fwd": _linear_kl_fwd_fake,
    "linear_kl_bwd": _linear_kl_bwd_fake,
    "linear_kl_fwd_with_grads": _linear_kl_fwd_with_grads_fake,
    "policy_loss_fwd": _policy_loss_fwd_fake,
    "linear_policy_loss_fwd": _linear_policy_loss_fwd_fake,
}

# The C++ ops (their schemas are declared in csrc/bindings.cpp).
CPP_OPS = tuple(FAKES)
# The Triton ops: linear_policy_loss and linear_kl's reductions have no Triton op of their own
# (they compose the others).
TRITON_OPS = ("linear_logprobs_fwd", "linear_logprobs_bwd", "linear_kl_fwd", "linear_kl_bwd", "policy_loss_fwd")

if _ext.has_cpu() or _ext.has_cuda():
    for _name in CPP_OPS:
        if hasattr(torch.ops.erpd, _name):
            torch.library.register_fake(f"erpd::{_name}")(FAKES[_name])


# --------------------------------------------------------------------------------------------
# Triton launchers as custom ops
# --------------------------------------------------------------------------------------------

_NO_MUTATION = ()


@torch.library.custom_op("erpd_triton::linear_logprobs_fwd", mutates_args=_NO_MUTATION)
def linear_logprobs_fwd(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, inv_temperature: float,
    softcap_scale: float, ignore_index: int, with_stats: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from erpd.kernels import linear_logprobs as k

    return k.linear_logprobs_fwd(hidden, weight, bias, targets, inv_temperature, softcap_scale, ignore_index, with_stats)


@torch.library.custom_op("erpd_triton::linear_logprobs_bwd", mutates_args=_NO_MUTATION)
def linear_logprobs_bwd(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor, entropy: Tensor,
    grad_logprobs: Tensor, grad_entropy: Optional[Tensor], inv_temperature: float, softcap_scale: float,
    ignore_index: int, need_grad_hidden: bool, need_grad_weight: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from erpd.kernels import linear_logprobs as k

    return k.linear_logprobs_bwd(hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy,
                                 inv_temperature, softcap_scale, ignore_index, need_grad_hidden, need_grad_weight)


@torch.library.custom_op("erpd_triton::linear_kl_fwd", mutates_args=_NO_MUTATION)
def linear_kl_fwd(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_hidden: Optional[Tensor],
    teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor], teacher_logits: Optional[Tensor],
    targets: Tensor, inv_temperature: float, ignore_index: int, mode: int, beta: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from erpd.kernels import linear_kl as k

    return k.linear_kl_fwd(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
                           targets, inv_temperature, ignore_index, mode, beta)


@torch.library.custom_op("erpd_triton::linear_kl_bwd", mutates_args=_NO_MUTATION)
def linear_kl_bwd(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_hidden: Optional[Tensor],
    teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor], teacher_logits: Optional[Tensor],
    targets: Tensor, lse_s: Tensor, lse_t: Tensor, aux: Tensor, grad_kl: Tensor, inv_temperature: float,
    ignore_index: int, mode: int, beta: float, need_grad_hidden: bool, need_grad_weight: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from erpd.kernels import linear_kl as k

    return k.linear_kl_bwd(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
                           targets, lse_s, lse_t, aux, grad_kl, inv_temperature, ignore_index, mode, beta,
                           need_grad_hidden, need_grad_weight)


@torch.library.custom_op("erpd_triton::policy_loss_fwd", mutates_args=_NO_MUTATION)
def policy_loss_fwd(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, ref_logprobs: Optional[Tensor],
    entropy: Optional[Tensor], is_weights: Optional[Tensor], num_items: Optional[Tensor], method: int, agg: int,
    ratio_lo: float, ratio_hi: float, dual_clip: float, tau_pos: float, tau_neg: float, kl_coef: float,
    kl_estimator: int, entropy_coef: float, num_items_value: float, norm_scale: float, kl_ratio_weighted: bool,
    need_grad_entropy: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from erpd.kernels import policy_loss as k

    return k.policy_loss_fwd(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights,
                             num_items, method, agg, ratio_lo, ratio_hi, dual_clip, tau_pos, tau_neg, kl_coef,
                             kl_estimator, entropy_coef, num_items_value, norm_scale, kl_ratio_weighted,
                             need_grad_entropy)


for _name in TRITON_OPS:
    globals()[_name].register_fake(FAKES[_name])


def impl(backend: str, name: str):
    """The registered op of `backend` ("triton", "cpu" or "cuda") for kernel contract `name`."""
    if backend == "triton":
        return getattr(torch.ops.erpd_triton, name)
    if backend in ("cpu", "cuda"):
        return getattr(torch.ops.erpd, name)
    raise AssertionError(backend)
