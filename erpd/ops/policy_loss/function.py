"""The autograd Function of `policy_loss`: the backend's forward returns the loss, the metrics
and the gradients (without 1/D); the backward scales them."""

from __future__ import annotations

import torch

from erpd import reference
from erpd.ops import _autograd, _library, policy_spec
from erpd.ops.policy_loss import library, torch_kernels  # noqa: F401  (they register the kernels)

OP = "policy_loss"

# The `stats` vector's entries, in order (the table: erpd/ops/policy_spec.py).
STAT_NAMES = policy_spec.STAT_NAMES
_ALWAYS = tuple((i, n) for i, n in enumerate(STAT_NAMES) if n not in ("inv_norm", "kl_ref", "entropy"))
_KL_REF, _ENTROPY = STAT_NAMES.index("kl_ref"), STAT_NAMES.index("entropy")


def kernel(backend: str):
    """The forward of `backend` for this op's contract."""
    return _library.impl(backend, "policy_loss_fwd")


def metrics_from_stats(stats: torch.Tensor, has_ref: bool, has_entropy: bool) -> dict[str, torch.Tensor]:
    """The metrics dict from a kernel's `stats` vector (0-dim views, no copies)."""
    vals = stats.unbind()
    out = {name: vals[i] for i, name in _ALWAYS}
    if has_ref:
        out["kl_ref"] = vals[_KL_REF]
    if has_entropy:
        out["entropy"] = vals[_ENTROPY]
    return out


class PolicyLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logprobs, entropy, old, adv, mask, ref, isw, num_items, args, backend, options):
        need_grad_entropy = entropy is not None and ctx.needs_input_grad[1] and args[9] != 0.0
        loss, stats, g_lp, g_ent = kernel(backend)(
            logprobs, old, adv, mask, ref, entropy, isw, num_items, *args, need_grad_entropy,
        )
        ctx.save_for_backward(g_lp, g_ent if need_grad_entropy else None, stats)
        if backend == "torch":  # `options`: the PolicyOptions behind `args`
            n = torch_kernels.reference_num_items(num_items, args[10])

            def recompute(lp, ent):
                return (reference.policy_loss(lp, old, adv, mask, options, is_weights=isw, ref_logprobs=ref,
                                              entropy=ent, num_items=n)[0],)

            _autograd.record_recompute(ctx, recompute, (logprobs, entropy), 11)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @_autograd.first_order_only(OP)
    def backward(ctx, grad_loss, _grad_stats):
        g_lp, g_ent, stats = ctx.saved_tensors
        scale = grad_loss * stats[0]
        return g_lp * scale, (None if g_ent is None else g_ent * scale), *([None] * 9)
