"""What the ops' `torch.autograd.Function`s share: their backwards are kernels (or gradients the
forward already computed, `GradsInForward`), correct to first order and not themselves
differentiable.

On the `torch` backend a gradient asked for with ``create_graph=True`` is exact instead: the
Function records a *recompute*, the op's definition in `erpd.reference` as a function of the
differentiable inputs (`record_recompute`), and the backward differentiates that with autograd.

Left alone, such a backward under ``create_graph=True`` returns gradients without a graph (or
with the part of one that its few torch ops record), so a gradient penalty built on them
silently loses its second-order terms. `first_order_only` refuses instead, when the gradient is
asked for with ``create_graph=True``, which the autograd engine tells a backward by running it in
grad mode. Refusing then, not when the gradient is differentiated later, is deliberate:
`torch.autograd.function.once_differentiable` defers the error to a node that raises if reached,
but it attaches that node only when the incoming gradient requires grad (not for
``torch.autograd.grad(loss, x, create_graph=True)``), and ``torch.autograd.grad(penalty, x)``
prunes the node (it leads to no input) and fails with "appears to not have been used in the graph".
"""

from __future__ import annotations

import functools

import torch


def double_backward_message(op: str) -> str:
    return (
        f"erpd.{op}: double backward (a gradient taken with create_graph=True) is not supported on the fused "
        "backends (cpu, cuda, triton, and every backend with tp_group): their backward is a kernel, not "
        "differentiable, so the gradient's own gradient would silently miss its second-order terms. "
        "Use backend='torch' (without tp_group) for higher-order gradients."
    )


def record_recompute(ctx, fn, inputs, num_args: int) -> None:
    """For the `torch` backend: `fn(*inputs)` recomputes the Function's differentiable outputs (a
    tuple, in order) from `inputs`, the first ``len(inputs)`` of its `num_args` arguments."""
    ctx.recompute = (fn, inputs, num_args)


def _create_graph() -> bool:
    # The engine runs a backward in grad mode iff create_graph. (torch.compile traces the
    # backward into a graph of its own, where grad mode says nothing about create_graph.)
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _higher_order(ctx, op: str, grad_outputs) -> tuple | None:
    """None outside ``create_graph=True``; there, the gradients of the recorded recompute, or an
    error naming ``erpd.<op>`` when the Function recorded none (the fused backends)."""
    if not _create_graph():
        return None
    if getattr(ctx, "recompute", None) is None:
        raise RuntimeError(double_backward_message(op))
    fn, inputs, num_args = ctx.recompute
    wanted = [i for i, x in enumerate(inputs) if x is not None and ctx.needs_input_grad[i]]
    outs = fn(*inputs)
    pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None and o.requires_grad]
    grads = [None] * num_args
    if pairs and wanted:
        got = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                                  create_graph=True, allow_unused=True)
        for i, g in zip(wanted, got):
            grads[i] = g
    return tuple(grads)


def first_order_only(op: str):
    """Decorator for a Function's ``backward``: under ``create_graph=True``, differentiate the
    recorded recompute (`record_recompute`, the `torch` backend), or raise, naming ``erpd.<op>``."""

    def wrap(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            grads = _higher_order(ctx, op, grad_outputs)
            return backward(ctx, *grad_outputs) if grads is None else grads

        return wrapper

    return wrap


def _is_one(grad: torch.Tensor) -> bool:
    """grad == 1, where reading it costs nothing: on CPU, outside torch.compile's tracing (on CUDA
    the read would be a host sync)."""
    return grad.device.type == "cpu" and not torch.compiler.is_compiling() and grad.item() == 1.0


class GradsInForward(torch.autograd.Function):
    """The Function of the losses whose fused forward already computed their gradients
    (`linear_policy_loss`, `linear_kl` with a reduction): the backward makes no pass over the
    vocabulary, it only scales the gradients by grad_output.

    ``apply(hidden, weight, bias, run, op, recompute) -> (loss, *extras)``: ``run(need_grad_hidden,
    need_grad_weight)`` returns ``(loss, (grad_hidden, grad_weight, grad_bias), extras)``, the
    scalar loss, its gradients w.r.t. hidden (in its [N, H] view), weight and bias, and a tuple of
    non-differentiable outputs (metrics, per-token values); ``op`` names the op in errors;
    ``recompute`` is None, or (backend `torch`) ``recompute(hidden, weight, bias) -> loss`` for a
    gradient taken with ``create_graph=True``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, run, op, recompute=None):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        loss, (gh, gw, gb), extras = run(need_h, need_w)
        # Held as attributes, not saved tensors: the backward scales them in place and hands them
        # to autograd, which then adopts them as .grad (or adds them into it) without a copy, so
        # no second [V, H] buffer exists at any point.
        ctx.grads = (gh if need_h else None, gw if need_w else None, gb if need_b else None)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.hidden_shape = hidden.shape
        ctx.op = op
        if recompute is not None:
            record_recompute(ctx, lambda h, w, b: (recompute(h, w, b),), (hidden, weight, bias), 6)
        ctx.mark_non_differentiable(*extras)
        return (loss, *extras)

    @staticmethod
    def backward(ctx, grad_loss, *_grad_extras):
        # The whole backward: the gradients were computed (and normalized) in the forward.
        grads = _higher_order(ctx, ctx.op, (grad_loss,))  # as first_order_only
        if grads is not None:
            return grads
        if ctx.grads is None:
            raise RuntimeError(
                f"erpd.{ctx.op}: a second backward through the same call; its gradients are computed in the "
                "forward and handed over by the first backward (retain_graph=True is not supported)"
            )
        gh, gw, gb = ctx.grads
        ctx.grads = None
        if not _is_one(grad_loss):  # loss.backward() seeds 1: then no pass over dW (V·H), ~1% of the op
            gh = None if gh is None else gh.mul_(grad_loss)
            gw = None if gw is None else gw.mul_(grad_loss)
            gb = None if gb is None else gb * grad_loss
        return (None if gh is None else gh.view(ctx.hidden_shape)), gw, (None if gb is None else gb.to(ctx.bias_dtype)), None, None, None
