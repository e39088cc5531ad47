"""`torch.library` registration of the `linear_logprobs` kernels: the fakes of its (fwd, bwd)
contract and the Triton launchers as `erpd_triton::` custom ops (erpd/ops/_library.py says why).

No `from __future__ import annotations`: `custom_op` infers each schema from real annotations.
"""

from typing import Optional

import torch
from torch import Tensor

from erpd.ops import _library


def _fwd_fake(hidden, weight, bias, targets, inv_temperature, softcap_scale, ignore_index, with_stats):
    stats = hidden.new_empty((3, hidden.shape[0]) if with_stats else (0,), dtype=torch.float32)
    return (*_library.row_stats(hidden, 3), stats)


def _bwd_fake(hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy, inv_temperature, softcap_scale,
              ignore_index, need_grad_hidden, need_grad_weight):
    return _library.grads(hidden, weight, bias, need_grad_hidden, need_grad_weight)


_library.register_fake("linear_logprobs_fwd", _fwd_fake)
_library.register_fake("linear_logprobs_bwd", _bwd_fake)


@torch.library.custom_op("erpd_triton::linear_logprobs_fwd", mutates_args=_library.NO_MUTATION)
def triton_fwd(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, inv_temperature: float,
    softcap_scale: float, ignore_index: int, with_stats: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from erpd.kernels import linear_logprobs as k

    return k.linear_logprobs_fwd(hidden, weight, bias, targets, inv_temperature, softcap_scale, ignore_index, with_stats)


@torch.library.custom_op("erpd_triton::linear_logprobs_bwd", mutates_args=_library.NO_MUTATION)
def triton_bwd(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor, entropy: Tensor,
    grad_logprobs: Tensor, grad_entropy: Optional[Tensor], inv_temperature: float, softcap_scale: float,
    ignore_index: int, need_grad_hidden: bool, need_grad_weight: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from erpd.kernels import linear_logprobs as k

    return k.linear_logprobs_bwd(hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy,
                                 inv_temperature, softcap_scale, ignore_index, need_grad_hidden, need_grad_weight)


_library.register_triton(triton_fwd)
_library.register_triton(triton_bwd)
