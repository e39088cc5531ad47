"""Ground truth for every erpd op: plain PyTorch that materializes the logits.

Each function here is the definition the fused backends are tested against. They compute in
float64 when given float64 inputs and in float32 otherwise (never in bf16/fp16: the fused
backends accumulate in float32 too), and they are differentiable through ordinary autograd.
They are also the `backend="torch"` implementation of the public ops.
"""

from __future__ import annotations

import math

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


KL_DIRECTIONS = ("forward", "reverse", "jsd")
# Floor of the tail masses of the top-k teacher form (1 - sum of the top-k probabilities).
TOPK_TAIL_EPS = 1e-12


def _kl_rows(logq_s: torch.Tensor, logq_t: torch.Tensor, direction: str, beta: float) -> torch.Tensor:
    """Per-row divergence between two log-distributions over the last dim (student, teacher)."""
    if direction == "jsd" and beta == 0.0:
        direction = "forward"
    elif direction == "jsd" and beta == 1.0:
        direction = "reverse"
    if direction == "forward":
        return (logq_t.exp() * (logq_t - logq_s)).sum(-1)
    if direction == "reverse":
        return (logq_s.exp() * (logq_s - logq_t)).sum(-1)
    # Mixture M = (1 - beta) S + beta T, in log space.
    log_m = torch.logaddexp(logq_s + math.log1p(-beta), logq_t + math.log(beta))
    kl_t = (logq_t.exp() * (logq_t - log_m)).sum(-1)
    kl_s = (logq_s.exp() * (logq_s - log_m)).sum(-1)
    return beta * kl_t + (1.0 - beta) * kl_s


def kl_from_logits(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    direction: str = "forward",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The divergence of :func:`linear_kl` from materialized student logits ``[..., V]`` (computed in
    ``logits.dtype``); the teacher gets no gradient."""
    logq_s = torch.log_softmax(logits / temperature, -1)
    if teacher_topk is not None:
        t_logp, ids = teacher_topk
        t_logp = t_logp.detach().to(logq_s.dtype)
        s_logp = logq_s.gather(-1, ids.long())
        tail_t = (1.0 - t_logp.exp().sum(-1)).clamp_min(TOPK_TAIL_EPS)
        tail_s = (1.0 - s_logp.exp().sum(-1)).clamp_min(TOPK_TAIL_EPS)
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1) + tail_t * (tail_t.log() - tail_s.log())
    logq_t = torch.log_softmax(teacher_logits.detach().to(logq_s.dtype) / temperature, -1)
    return _kl_rows(logq_s, logq_t, direction, beta)


def linear_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    direction: str = "forward",
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    r"""Per-token divergence between the teacher's and the student's next-token distributions.

    Student: :math:`\log q^S = \mathrm{log\_softmax}((W h + b)/\tau)`. Teacher, one of:

    * fused: :math:`\log q^T = \mathrm{log\_softmax}((W_T h_T + b_T)/\tau)` (hidden sizes may differ);
    * dense: :math:`\log q^T = \mathrm{log\_softmax}(\text{teacher\_logits}/\tau)`;
    * top-k: ``teacher_topk = (logprobs [..., k], ids [..., k])``, the teacher's log-probs (used as
      given; ``temperature`` applies to the student only) on its top-k ids. Only
      ``direction="forward"``. The distribution is coarsened to the k ids plus one *tail bucket*
      holding the remaining mass, :math:`t^T = 1 - \sum_K q^T`, :math:`t^S = 1 - \sum_K q^S`:

      .. math:: \mathrm{KL} = \sum_{i \in K} q^T_i (\log q^T_i - \log q^S_i) + t^T (\log t^T - \log t^S).

      This is an exact KL between two distributions over k+1 outcomes: ≥ 0, and 0 when the
      student matches the teacher. Tail masses are clamped below at ``1e-12`` (``TOPK_TAIL_EPS``).

    Directions: ``forward`` = KL(T‖S) = :math:`\sum q^T(\log q^T - \log q^S)`; ``reverse`` =
    KL(S‖T); ``jsd`` = the generalized Jensen-Shannon divergence of TRL's GKD and Liger's JSD,
    :math:`\beta\,\mathrm{KL}(T‖M) + (1-\beta)\,\mathrm{KL}(S‖M)` with
    :math:`M = (1-\beta) S + \beta T`; ``beta`` 0 and 1 are defined as the forward and the
    reverse KL (the limits of the mixture form are 0 there, so both libraries special-case them).

    Rows whose ``targets`` equal ``ignore_index`` give 0; ``targets`` is only a mask here (None:
    every row counts). The teacher gets no gradient.
    """
    acc = _acc_dtype(hidden)
    logits = F.linear(hidden.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    if teacher_topk is None and teacher_logits is None:
        teacher_logits = F.linear(
            teacher_hidden.to(acc), teacher_weight.to(acc), None if teacher_bias is None else teacher_bias.to(acc)
        )
    kl = kl_from_logits(logits, teacher_logits, teacher_topk, direction=direction, beta=beta, temperature=temperature)
    if targets is not None:
        kl = torch.where(targets != ignore_index, kl, kl.new_zeros(()))
    return kl

