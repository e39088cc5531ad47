"""`torch.library` registration of the `policy_loss` kernel: the fake of its contract and the
Triton launcher as an `erpd_triton::` custom op (erpd/ops/_library.py says why).

No `from __future__ import annotations`: `custom_op` infers each schema from real annotations.
"""

from typing import Optional

import torch
from torch import Tensor

from erpd.ops import _library


def _fwd_fake(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, num_items, method, agg,
              ratio_lo, ratio_hi, dual_clip, tau_pos, tau_neg, kl_coef, kl_estimator, entropy_coef, num_items_value,
              norm_scale, kl_ratio_weighted, need_grad_entropy):
    f32 = dict(dtype=torch.float32)
    return (
        logprobs.new_empty((), **f32),
        logprobs.new_empty(_library.NUM_POLICY_STATS, **f32),
        logprobs.new_empty(logprobs.shape, **f32),
        logprobs.new_empty(logprobs.shape if need_grad_entropy else (0,), **f32),
    )


_library.register_fake("policy_loss_fwd", _fwd_fake)


@torch.library.custom_op("erpd_triton::policy_loss_fwd", mutates_args=_library.NO_MUTATION)
def triton_fwd(
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


_library.register_triton(triton_fwd)
