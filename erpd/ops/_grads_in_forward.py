"""The autograd Function of the losses whose fused forward already computed their gradients
(`linear_policy_loss`, `linear_kl` with a reduction): the backward makes no pass over the
vocabulary, it only scales the gradients by grad_output."""

from __future__ import annotations

import torch


class GradsInForward(torch.autograd.Function):
    """``apply(hidden, weight, bias, run) -> (loss, *extras)``.

    ``run(need_grad_hidden, need_grad_weight)`` returns ``(loss, *extras, grad_hidden,
    grad_weight, grad_bias)``: a scalar loss, any number of non-differentiable outputs (metrics,
    per-token values) and the loss's gradients w.r.t. hidden (in its [N, H] view), weight and bias.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, run):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        loss, *extras, gh, gw, gb = run(need_h, need_w)
        # Held as attributes, not saved tensors: the backward scales them in place and hands them
        # to autograd, which then adopts them as .grad (or adds them into it) without a copy, so
        # no second [V, H] buffer exists at any point.
        ctx.grads = (gh if need_h else None, gw if need_w else None, gb if need_b else None)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.hidden_shape = hidden.shape
        ctx.mark_non_differentiable(*extras)
        return (loss, *extras)

    @staticmethod
    def backward(ctx, grad_loss, *_grad_extras):
        # The whole backward: the gradients were computed (and normalized) in the forward.
        if ctx.grads is None:
            raise RuntimeError(
                "a second backward through the same call of a loss whose gradients are computed in the forward "
                "(linear_policy_loss, linear_kl with a reduction): the first backward handed them over "
                "(retain_graph=True is not supported)"
            )
        gh, gw, gb = ctx.grads
        ctx.grads = None
        if gh is not None:
            gh = gh.mul_(grad_loss).view(ctx.hidden_shape)
        if gw is not None:
            gw = gw.mul_(grad_loss)
        if gb is not None:
            gb = (gb * grad_loss).to(ctx.bias_dtype)
        return gh, gw, gb, None
