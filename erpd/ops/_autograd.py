"""What the ops' `torch.autograd.Function`s share: their backwards are fused kernels (or
gradients the forward already computed), correct to first order and not themselves
differentiable.

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


def first_order_only(op: str):
    """Decorator for a Function's ``backward``: raise, naming ``erpd.<op>``, under ``create_graph=True``."""

    def wrap(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            # The engine runs a backward in grad mode iff create_graph. (torch.compile traces the
            # backward into a graph of its own, where grad mode says nothing about create_graph.)
            if torch.is_grad_enabled() and not torch.compiler.is_compiling():
                raise RuntimeError(double_backward_message(op))
            return backward(ctx, *grad_outputs)

        return wrapper

    return wrap
