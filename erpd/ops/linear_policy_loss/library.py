"""`torch.library` registration of the `linear_policy_loss` kernel: the fake of its contract (a
C++/CUDA op only; its Triton and torch backends compose the other ops' kernels).
"""

import torch

from erpd.ops import _library


def _fwd_fake(hidden, weight, bias, targets, inv_temperature, softcap_scale, ignore_index, old_logprobs, advantages,
              mask, ref_logprobs, is_weights, num_items, method, agg, ratio_lo, ratio_hi, dual_clip, tau_pos, tau_neg,
              kl_coef, kl_estimator, entropy_coef, num_items_value, norm_scale, kl_ratio_weighted, need_grad_hidden,
              need_grad_weight):
    f32 = dict(dtype=torch.float32)
    return (
        hidden.new_empty((), **f32),
        hidden.new_empty(_library.NUM_POLICY_STATS, **f32),
        *_library.grads(hidden, weight, bias, need_grad_hidden, need_grad_weight),
        hidden.new_empty(hidden.shape[0], **f32),
    )


_library.register_fake("linear_policy_loss_fwd", _fwd_fake)
