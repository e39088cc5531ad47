"""The gradients-in-the-forward runs of `linear_policy_loss` (for
`erpd.ops._autograd.GradsInForward`): one C++/CUDA kernel, or the other ops' kernels composed."""

from __future__ import annotations

import torch

from erpd import reference
from erpd.ops import _library
from erpd.ops.linear_logprobs.function import kernels as logprobs_kernels
from erpd.ops.linear_logprobs.function import reference_head
from erpd.ops.linear_policy_loss import library  # noqa: F401  (it registers the kernel's fake)
from erpd.ops.policy_loss.function import kernel as policy_kernel

OP = "linear_policy_loss"


def run_fused(backend, h2, w, b, t1, inv_t, cap, ignore_index, old, adv, mask, ref, isw, n_tensor, args):
    """cpu or cuda: one erpd._C kernel, whose CPU or CUDA implementation the dispatcher picks by device."""

    def run(need_h, need_w):
        loss, stats, gh, gw, gb, lp = _library.impl(backend, "linear_policy_loss_fwd")(
            h2, w, b, t1, inv_t, cap, ignore_index, old, adv, mask, ref, isw, n_tensor, *args, need_h, need_w,
        )
        return loss, (gh, gw, gb), (stats, lp)

    return run


def run_composed(backend, h2, w, b, t1, inv_t, cap, ignore_index, old, adv, mask, ref, isw, n_tensor, args):
    """triton or torch: the `linear_logprobs` forward, the `policy_loss` kernel and the
    `linear_logprobs` backward, inside the forward (8·N·H·V)."""
    lp_fwd, lp_bwd = logprobs_kernels(backend)
    pl_fwd = policy_kernel(backend)
    B, T = mask.shape

    def run(need_h, need_w):
        lp, ent, lse, _ = lp_fwd(h2, w, b, t1, inv_t, cap, ignore_index, False)
        lp2, ent2 = lp.view(B, T), ent.view(B, T)
        with_grad_entropy = args[9] != 0.0
        loss, stats, g_lp, g_ent = pl_fwd(
            lp2, lp2 if old is None else old, adv, mask, ref, ent2, isw, n_tensor, *args, with_grad_entropy,
        )
        # The policy kernel leaves out 1/D (stats[0]); the GEMMs below need the true gradients.
        g_lp = g_lp * stats[0]
        g_ent = g_ent * stats[0] if with_grad_entropy else None
        gh, gw, gb = lp_bwd(
            h2, w, b, t1, lse, ent, g_lp.reshape(-1), None if g_ent is None else g_ent.reshape(-1),
            inv_t, cap, ignore_index, need_h, need_w,
        )
        return loss, (gh, gw, gb), (stats, lp)

    return run


def recompute(t1, inv_t, cap, ignore_index, old, adv, mask, ref, isw, num_items, options):
    """The loss by its definition, a function of (hidden, weight, bias): the torch backend's
    gradients of gradients."""
    B, T = mask.shape

    def loss(hidden, weight, bias):
        lp, ent = reference.linear_logprobs(hidden.reshape(B * T, -1), weight, t1, bias=bias, ignore_index=ignore_index,
                                            with_entropy=True, **reference_head(inv_t, cap))
        lp = lp.view(B, T)
        return reference.policy_loss(lp, lp.detach() if old is None else old, adv, mask, options, is_weights=isw,
                                     ref_logprobs=ref, entropy=ent.view(B, T), num_items=num_items)[0]

    return loss
