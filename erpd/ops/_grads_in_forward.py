"""The autograd Function of the losses whose fused forward already computed their gradients
(`linear_policy_loss`, `linear_kl` with a reduction): the backward makes no pass over the
vocabulary, it only scales the gradients by grad_output."""

from __future__ import annotations

import torch


def _is_one(grad: torch.Tensor) -> bool:
    """grad == 1, where reading it costs nothing: on CPU, outside torch.compile's tracing (on CUDA
    the read would be a host sync)."""
    return grad.device.type == "cpu" and not torch.compiler.is_compiling() and grad.item() == 1.0


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
        if not _is_one(grad_loss):  # loss.backward() seeds 1: then no pass over dW (V·H), ~1% of the op
            gh = None if gh is None else gh.mul_(grad_loss)
            gw = None if gw is None else gw.mul_(grad_loss)
            gb = None if gb is None else gb * grad_loss
        return (None if gh is None else gh.view(ctx.hidden_shape)), gw, (None if gb is None else gb.to(ctx.bias_dtype)), None
