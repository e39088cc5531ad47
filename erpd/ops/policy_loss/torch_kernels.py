"""The `torch` backend's `policy_loss` kernel: the contract of erpd/ops/policy_loss/__init__.py
computed from the definition (`erpd.reference.policy_loss`) with autograd, so that the policy
math has no second PyTorch copy."""

from __future__ import annotations

import math

import torch

from erpd import reference
from erpd.ops import _library, policy_spec
from erpd.ops.options import PolicyOptions


def options_of(method, agg, ratio_lo, ratio_hi, dual_clip, tau_pos, tau_neg, kl_coef, kl_estimator, entropy_coef,
               norm_scale, kl_ratio_weighted) -> PolicyOptions:
    """The options that `CheckedPolicyOptions.kernel_args` turned into these kernel arguments."""
    name = policy_spec.METHODS[method][0]
    agg_name = policy_spec.AGGS[agg][0]
    bounds = {}
    if name in ("ppo", "gspo"):
        bounds = dict(clip_low=1.0 - ratio_lo, clip_high=ratio_hi - 1.0, dual_clip=dual_clip or None)
    elif name == "cispo":
        bounds = dict(cispo_floor=ratio_lo or None, cispo_cap=ratio_hi)
    elif name == "reinforce":
        bounds = dict(reinforce_cap=None if ratio_hi == math.inf else ratio_hi)
    return PolicyOptions(
        method=name, agg=agg_name, tau_pos=tau_pos, tau_neg=tau_neg, kl_coef=kl_coef,
        kl_estimator=policy_spec.KL_ESTIMATORS[kl_estimator][0], entropy_coef=entropy_coef,
        norm_length=int(norm_scale) if agg_name == "seq-mean-token-sum-norm" else None,
        kl_ratio_weighted=kl_ratio_weighted, **bounds,
    )


def reference_num_items(num_items, num_items_value: float):
    """The kernels' (tensor | None, value; 0 = not given) form of num_items as the reference takes it."""
    return num_items if num_items is not None else (num_items_value or None)


def fwd(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, num_items, method, agg, ratio_lo,
        ratio_hi, dual_clip, tau_pos, tau_neg, kl_coef, kl_estimator, entropy_coef, num_items_value, norm_scale,
        kl_ratio_weighted, need_grad_entropy):
    """(loss, stats [NUM_STATS], grad_logprobs, grad_entropy | empty), the gradients without the
    1/D of stats[0], as every backend returns them."""
    opts = options_of(method, agg, ratio_lo, ratio_hi, dual_clip, tau_pos, tau_neg, kl_coef, kl_estimator,
                      entropy_coef, norm_scale, kl_ratio_weighted)
    n = reference_num_items(num_items, num_items_value)
    zero_ent = entropy is None or not need_grad_entropy

    def loss_of(lp, ent):  # -> (loss, metrics)
        return reference.policy_loss(lp, old_logprobs, advantages, mask, opts, is_weights=is_weights,
                                     ref_logprobs=ref_logprobs, entropy=entropy if zero_ent else ent, num_items=n)

    # torch.func rather than torch.autograd.grad: torch.compile traces it (fullgraph).
    ent_in = logprobs if zero_ent else entropy
    (g_lp, g_ent), (loss, metrics) = torch.func.grad_and_value(loss_of, argnums=(0, 1), has_aux=True)(
        logprobs.detach(), ent_in.detach())
    acc = loss.dtype
    d = reference.policy_agg_count(mask, opts.agg, n, acc)  # D: the kernels' stats[0] is 1 / D
    stats = torch.stack([1.0 / d if s == "inv_norm" else metrics.get(s, d.new_zeros(())).to(acc)
                         for s in policy_spec.STAT_NAMES])
    return loss.detach(), stats, g_lp * d, (g_ent * d if not zero_ent else logprobs.new_empty(0))


_library.register_torch("policy_loss_fwd", fwd)
