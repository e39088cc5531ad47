"""`nn.Module` forms of the erpd ops, for dropping into other trainers."""

from __future__ import annotations

import torch

from erpd.ops import linear_logprobs


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


__all__ = ["LinearLogprobs"]
