"""verl's fused log-prob/entropy contract on top of :func:`erpd.linear_logprobs`.

verl (``actor_rollout_ref.model.use_fused_kernels=True``) patches the model's forward to run the
backbone only and to call ``kernel(hidden_states, lm_head.weight, labels, temperature)``, which
returns per-token ``(log_probs, entropy)`` without logits; the policy, KL and entropy losses are
then computed from those. :func:`logprobs_and_entropy` is that kernel, and
:class:`FusedLinearForPPO` has the call signature of verl's torch module of the same name (its
``input_ids`` are the already-shifted labels, as in verl).
"""

from __future__ import annotations

import torch

from erpd.ops import linear_logprobs


def logprobs_and_entropy(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(log_probs, entropy)`` of ``labels`` under ``softmax(hidden_states @ lm_head_weight.T / temperature)``.

    ``hidden_states [..., H]`` (verl passes ``[1, total_tokens, H]`` under remove-padding),
    ``lm_head_weight [V, H]``, ``labels [...]``; float32 outputs of shape ``[...]``, both
    differentiable (verl backpropagates an entropy bonus through the second).
    """
    logp, entropy = linear_logprobs(
        hidden_states, lm_head_weight, labels, bias=bias, temperature=temperature, ignore_index=ignore_index,
        with_entropy=True, backend=backend,
    )
    return logp, entropy


class FusedLinearForPPO(torch.nn.Module):
    """Signature of verl's ``verl.utils.experimental.torch_functional.FusedLinearForPPO``.

    ``chunk_size`` is accepted for compatibility and unused: erpd's backends choose their own
    blocking (the C++ driver by a logits byte budget, the Triton kernels by tiles).
    """

    def __init__(self, chunk_size: int = 512, *, backend: str = "auto"):
        super().__init__()
        self.chunk_size = chunk_size
        self.backend = backend

    def forward(self, hidden_states, vocab_weights, input_ids, temperature: float = 1.0):
        return logprobs_and_entropy(hidden_states, vocab_weights, input_ids.long(), temperature, backend=self.backend)


__all__ = ["FusedLinearForPPO", "logprobs_and_entropy"]
