"""Ground truth for every erpd op: plain PyTorch that materializes the logits.

Each function here is the definition the fused backends are tested against. They compute in
float64 when given float64 inputs and in float32 otherwise (never in bf16/fp16: the fused
backends accumulate in float32 too), and they are differentiable through ordinary autograd.
They are also the `backend="torch"` implementation of the public ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Per-token log-probability of ``targets`` (and entropy) under ``softmax((hidden @ weight.T + bias) / temperature)``.

    For a row with logits :math:`z = (W h + b)/\tau \in \mathbb{R}^V` and target :math:`y`:

    .. math::
        \mathrm{lse} = \log \sum_k e^{z_k}, \qquad
        \log p_y = z_y - \mathrm{lse}, \qquad
        H = -\sum_k p_k \log p_k = \mathrm{lse} - \sum_k p_k z_k .

    Rows whose target equals ``ignore_index`` give 0 for both outputs and get no gradient.

    Shapes: ``hidden [..., H]``, ``weight [V, H]``, ``bias [V]``, ``targets [...]``; outputs ``[...]``.
    """
    acc = _acc_dtype(hidden)
    logits = F.linear(hidden.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    logp = logp_all.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    zero = logp.new_zeros(())
    logp = torch.where(valid, logp, zero)
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        entropy = torch.where(valid, entropy, zero)
    return logp, entropy
