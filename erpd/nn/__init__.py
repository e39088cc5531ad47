"""`nn.Module` forms of the erpd ops, for dropping into other trainers."""

from __future__ import annotations

import torch

from erpd.ops import linear_kl, linear_logprobs

REDUCTIONS = ("none", "sum", "mean")


class LinearLogprobs(torch.nn.Module):
    """Module form of :func:`erpd.linear_logprobs`.

    ``forward(hidden, weight, targets, bias=None) -> (logprobs, entropy | None)``; the LM head is
    passed at call time (as Liger's fused losses do) so the module holds no parameters and works
    with tied embeddings and sharded heads alike.
    """

    def __init__(self, *, temperature: float = 1.0, ignore_index: int = -100, with_entropy: bool = False, backend: str = "auto"):
        super().__init__()
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.with_entropy = with_entropy
        self.backend = backend

    def forward(self, hidden, weight, targets, bias=None):
        return linear_logprobs(
            hidden, weight, targets, bias=bias, temperature=self.temperature,
            ignore_index=self.ignore_index, with_entropy=self.with_entropy, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, ignore_index={self.ignore_index}, "
                f"with_entropy={self.with_entropy}, backend={self.backend!r}")


class LinearKL(torch.nn.Module):
    """Module form of :func:`erpd.linear_kl` with a ``torch.nn``-style ``reduction``.

    ``forward(hidden, weight, targets=None, bias=None, *, teacher_hidden=None, teacher_weight=None,
    teacher_bias=None, teacher_logits=None, teacher_topk=None)``. ``reduction``: ``"none"``
    (per token), ``"sum"``, or ``"mean"`` over the tokens that count (targets != ignore_index;
    all tokens when targets is None); a batch with no such token gives 0, still differentiable.
    """

    def __init__(self, *, direction: str = "forward", beta: float = 0.5, temperature: float = 1.0,
                 ignore_index: int = -100, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.direction, self.beta, self.temperature = direction, beta, temperature
        self.ignore_index, self.reduction, self.backend = ignore_index, reduction, backend

    def forward(self, hidden, weight, targets=None, bias=None, *, teacher_hidden=None, teacher_weight=None,
                teacher_bias=None, teacher_logits=None, teacher_topk=None):
        kl = linear_kl(
            hidden, weight, targets, bias=bias, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
            teacher_bias=teacher_bias, teacher_logits=teacher_logits, teacher_topk=teacher_topk,
            direction=self.direction, beta=self.beta, temperature=self.temperature,
            ignore_index=self.ignore_index, backend=self.backend,
        )
        if self.reduction == "none":
            return kl
        if self.reduction == "sum":
            return kl.sum()
        count = kl.numel() if targets is None else (targets != self.ignore_index).sum()
        # Ignored tokens are already 0 in kl; clamp keeps an all-ignored batch at 0, not NaN.
        return kl.sum() / torch.as_tensor(count, device=kl.device).clamp_min(1)

    def extra_repr(self) -> str:
        return (f"direction={self.direction!r}, beta={self.beta}, temperature={self.temperature}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, backend={self.backend!r}")


__all__ = ["LinearKL", "LinearLogprobs"]
