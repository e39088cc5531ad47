"""`torch.library` registration of the `linear_kl` kernels: the fakes of its contracts (per-token
fwd and bwd, and the reduced loss's fwd_with_grads) and the Triton launchers as `erpd_triton::`
custom ops (erpd/ops/_library.py says why).

No `from __future__ import annotations`: `custom_op` infers each schema from real annotations.
"""

from typing import Optional

import torch
from torch import Tensor

from erpd.ops import _library


def _fwd_fake(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, targets,
              inv_temperature, ignore_index, mode, beta):
    return _library.row_stats(hidden, 4)


def _bwd_fake(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, targets, lse_s,
              lse_t, aux, grad_kl, inv_temperature, ignore_index, mode, beta, need_grad_hidden, need_grad_weight):
    return _library.grads(hidden, weight, bias, need_grad_hidden, need_grad_weight)


def _fwd_with_grads_fake(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, targets,
                         grad_kl, inv_temperature, ignore_index, mode, beta, need_grad_hidden, need_grad_weight):
    return (*_library.row_stats(hidden, 1), *_library.grads(hidden, weight, bias, need_grad_hidden, need_grad_weight))


_library.register_fake("linear_kl_fwd", _fwd_fake)
_library.register_fake("linear_kl_bwd", _bwd_fake)
_library.register_fake("linear_kl_fwd_with_grads", _fwd_with_grads_fake)


@torch.library.custom_op("erpd_triton::linear_kl_fwd", mutates_args=_library.NO_MUTATION)
def triton_fwd(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_hidden: Optional[Tensor],
    teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor], teacher_logits: Optional[Tensor],
    targets: Tensor, inv_temperature: float, ignore_index: int, mode: int, beta: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from erpd.kernels import linear_kl as k

    return k.linear_kl_fwd(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
                           targets, inv_temperature, ignore_index, mode, beta)


@torch.library.custom_op("erpd_triton::linear_kl_bwd", mutates_args=_library.NO_MUTATION)
def triton_bwd(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_hidden: Optional[Tensor],
    teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor], teacher_logits: Optional[Tensor],
    targets: Tensor, lse_s: Tensor, lse_t: Tensor, aux: Tensor, grad_kl: Tensor, inv_temperature: float,
    ignore_index: int, mode: int, beta: float, need_grad_hidden: bool, need_grad_weight: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from erpd.kernels import linear_kl as k

    return k.linear_kl_bwd(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
                           targets, lse_s, lse_t, aux, grad_kl, inv_temperature, ignore_index, mode, beta,
                           need_grad_hidden, need_grad_weight)


_library.register_triton(triton_fwd)
_library.register_triton(triton_bwd)
