"""The autograd Function of `linear_logprobs`: one (fwd, bwd) kernel pair per backend
(`kernels`), the forward keeping only O(N) statistics and the backward recomputing the logits."""

from __future__ import annotations

import torch

from erpd import reference
from erpd.ops import _autograd, _library
from erpd.ops.linear_logprobs import library, torch_kernels  # noqa: F401  (they register the kernels)

OP = "linear_logprobs"


def kernels(backend: str):
    """(fwd, bwd) of `backend` for this op's contract."""
    return _library.impl(backend, "linear_logprobs_fwd"), _library.impl(backend, "linear_logprobs_bwd")


def reference_head(inv_temperature: float, softcap_scale: float) -> dict:
    """The reference's (temperature, logit_scale, softcap) for the kernels' two numbers."""
    if softcap_scale > 0:
        return dict(temperature=1.0, logit_scale=softcap_scale * inv_temperature, softcap=inv_temperature)
    return dict(temperature=1.0 / inv_temperature)


class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temperature, softcap_scale, ignore_index, with_stats, backend):
        fwd, _ = kernels(backend)
        logp, entropy, lse, stats = fwd(hidden, weight, bias, targets, inv_temperature, softcap_scale, ignore_index,
                                        with_stats)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.args = (inv_temperature, softcap_scale, ignore_index)
        ctx.backend = backend
        if backend == "torch":  # gradients of gradients: the definition, differentiated
            head = reference_head(inv_temperature, softcap_scale)

            def recompute(h, w, b):
                return reference.linear_logprobs(h, w, targets, bias=b, ignore_index=ignore_index, with_entropy=True,
                                                 **head)

            _autograd.record_recompute(ctx, recompute, (hidden, weight, bias), 9)
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)
        return logp, entropy, stats

    @staticmethod
    @_autograd.first_order_only(OP)
    def backward(ctx, grad_logp, grad_entropy, _grad_stats):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_logp is None and grad_entropy is None:
            return (None,) * 9
        acc = lse.dtype
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        _, bwd = kernels(ctx.backend)
        gh, gw, gb = bwd(
            hidden, weight, bias, targets, lse, entropy,
            grad_logp.to(acc).contiguous(),
            None if grad_entropy is None else grad_entropy.to(acc).contiguous(),
            *ctx.args, need_h, need_w,
        )
        gb = gb.to(bias.dtype) if (need_b and bias is not None) else None
        return (gh if need_h else None), (gw if need_w else None), gb, *([None] * 6)
