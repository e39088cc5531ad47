"""`nn.Module` forms of the erpd ops, for dropping into other trainers."""

from __future__ import annotations

import torch

from erpd.ops import PolicyOptions, linear_kl, linear_logprobs, linear_policy_loss, policy_loss
from erpd.ops.options import DEFAULTS

REDUCTIONS = ("none", "sum", "mean")


class LinearLogprobs(torch.nn.Module):
    """Module form of :func:`erpd.linear_logprobs`.

    ``forward(hidden, weight, targets, bias=None) -> (logprobs, entropy | None)``; the LM head is
    passed at call time (as Liger's fused losses do) so the module holds no parameters and works
    with tied embeddings and sharded heads alike.
    """

    def __init__(self, *, temperature: float = 1.0, ignore_index: int = -100, with_entropy: bool = False,
                 backend: str = "auto", logit_scale: float = 1.0, softcap: float | None = None):
        super().__init__()
        self.temperature = temperature
        self.logit_scale, self.softcap = logit_scale, softcap
        self.ignore_index = ignore_index
        self.with_entropy = with_entropy
        self.backend = backend

    def forward(self, hidden, weight, targets, bias=None):
        return linear_logprobs(
            hidden, weight, targets, bias=bias, temperature=self.temperature, logit_scale=self.logit_scale,
            softcap=self.softcap, ignore_index=self.ignore_index, with_entropy=self.with_entropy, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, ignore_index={self.ignore_index}, "
                f"with_entropy={self.with_entropy}, backend={self.backend!r}")


class LinearKL(torch.nn.Module):
    """Module form of :func:`erpd.linear_kl` with a ``torch.nn``-style ``reduction``.

    ``forward(hidden, weight, targets=None, bias=None, *, teacher_hidden=None, teacher_weight=None,
    teacher_bias=None, teacher_logits=None, teacher_topk=None, num_items=None, token_weights=None)``.
    ``reduction``: ``"none"`` (per token), ``"sum"``, or ``"mean"`` over the tokens that count
    (targets != ignore_index; all tokens when targets is None), or over ``num_items`` for
    gradient accumulation; a batch with no such token gives 0, still differentiable. The sum and
    the mean compute their gradients in the forward (see :func:`erpd.linear_kl`).
    """

    def __init__(self, *, direction: str = "forward", beta: float = 0.5, temperature: float = 1.0,
                 ignore_index: int = -100, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.direction, self.beta, self.temperature = direction, beta, temperature
        self.ignore_index, self.reduction, self.backend = ignore_index, reduction, backend

    def forward(self, hidden, weight, targets=None, bias=None, *, teacher_hidden=None, teacher_weight=None,
                teacher_bias=None, teacher_logits=None, teacher_topk=None, num_items=None, token_weights=None):
        return linear_kl(
            hidden, weight, targets, bias=bias, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
            teacher_bias=teacher_bias, teacher_logits=teacher_logits, teacher_topk=teacher_topk,
            direction=self.direction, beta=self.beta, temperature=self.temperature,
            ignore_index=self.ignore_index, backend=self.backend, reduction=self.reduction, num_items=num_items,
            token_weights=token_weights,
        )

    def extra_repr(self) -> str:
        return (f"direction={self.direction!r}, beta={self.beta}, temperature={self.temperature}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, backend={self.backend!r}")


class _PolicyModule(torch.nn.Module):
    """What PolicyLoss and LinearPolicyLoss share: a :class:`erpd.PolicyOptions` (``options``, or
    its fields as keyword arguments) and the backend."""

    def __init__(self, options: PolicyOptions | None = None, *, backend: str = "auto", **option_kwargs):
        super().__init__()
        self.options = PolicyOptions.of(options, f"erpd.nn.{type(self).__name__}", **option_kwargs)
        self.backend = backend

    def extra_repr(self) -> str:
        o = self.options
        changed = {k: v for k, v in o.asdict().items() if k in ("method", "agg") or v != getattr(DEFAULTS, k)}
        if self.backend != "auto":
            changed["backend"] = self.backend
        return ", ".join(f"{k}={v!r}" for k, v in changed.items())


class PolicyLoss(_PolicyModule):
    """Module form of :func:`erpd.policy_loss`; the constructor takes its options (a
    :class:`erpd.PolicyOptions` or its fields as keyword arguments) and ``backend``.

    ``forward(logprobs, old_logprobs, advantages, mask, *, ref_logprobs=None, entropy=None,
    is_weights=None, num_items=None) -> (loss, metrics)``.
    """

    def forward(self, logprobs, old_logprobs, advantages, mask, *, ref_logprobs=None, entropy=None, is_weights=None,
                num_items=None):
        return policy_loss(
            logprobs, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs, entropy=entropy,
            is_weights=is_weights, num_items=num_items, options=self.options, backend=self.backend,
        )


class LinearPolicyLoss(_PolicyModule):
    """Module form of :func:`erpd.linear_policy_loss`; the constructor takes its options (as
    :class:`PolicyLoss`) plus ``temperature`` and ``ignore_index``.

    ``forward(hidden, weight, targets, old_logprobs, advantages, mask, *, bias=None,
    ref_logprobs=None, is_weights=None, num_items=None) -> (loss, metrics)``; the LM head is
    passed at call time, as for :class:`LinearLogprobs`.
    """

    def __init__(self, options: PolicyOptions | None = None, *, temperature: float = 1.0, ignore_index: int = -100,
                 backend: str = "auto", **option_kwargs):
        super().__init__(options, backend=backend, **option_kwargs)
        self.temperature = temperature
        self.ignore_index = ignore_index

    def forward(self, hidden, weight, targets, old_logprobs, advantages, mask, *, bias=None, ref_logprobs=None,
                is_weights=None, num_items=None):
        return linear_policy_loss(
            hidden, weight, targets, old_logprobs, advantages, mask, bias=bias, temperature=self.temperature,
            ignore_index=self.ignore_index, ref_logprobs=ref_logprobs, is_weights=is_weights, num_items=num_items,
            options=self.options, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, ignore_index={self.ignore_index}, " + super().extra_repr()


__all__ = ["LinearKL", "LinearLogprobs", "LinearPolicyLoss", "PolicyLoss"]
