"""What the ERPD trainer computes itself: the response-level stage-1 objectives and the stage-2
signals. Everything token-level that is a policy loss (ppo, sapo, cispo, the stage-2 clipped
surrogate, the KL term on the sampled tokens) is ``erpd.linear_policy_loss``; the full-vocabulary
KLs are ``erpd.linear_kl``.

Shapes: ``logprobs``, ``ref_logprobs`` (π0), ``signal``, ``mask`` are ``[B, T]`` (response
tokens, ``mask`` False past each response's end); ``rewards``, ``baseline``, ``group`` are ``[B]``.

Stage 1, response level (Δ = Σ_t log π/π0 over the response, R its reward):

* ``ce``: −[R log σ(βΔ) + (1 − R) log(1 − σ(βΔ))]; our reading of the paper's "CE" objective: a
  classifier of the outcome whose logit is the scaled sequence log-ratio to the unlearned
  reference π0.
* ``mse``: (βΔ − (R − b))², b the group-mean reward; our reading of the paper's "MSE with an
  unlearned policy reference": regress the scaled log-ratio onto the centered reward.

Stage 2: ``process_signal`` (scale, clip, centering per response or per prompt group, outcome
gating), ``mixed_groups`` (prompts with reward information), ``standardize`` (``combined``), and
``kl_trust_mask`` (for the full-vocabulary KL signals, drop tokens already outside the trust
region in the direction the KL pulls them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sequence_logratio(logprobs, ref_logprobs, mask) -> torch.Tensor:
    """Δ = Σ_t (log π − log π0) over each response: ``[B]``."""
    return ((logprobs - ref_logprobs) * mask).sum(1)


def ce(logprobs, ref_logprobs, rewards, mask, beta: float = 0.1) -> torch.Tensor:
    """Per-response ``[B]``: −[R log σ(βΔ) + (1 − R) log(1 − σ(βΔ))]."""
    z = beta * sequence_logratio(logprobs, ref_logprobs, mask)
    # R log σ(z) + (1−R) log(1−σ(z)) written with logsigmoid for stability at large |z|.
    return -(rewards * F.logsigmoid(z) + (1 - rewards) * F.logsigmoid(-z))


def mse(logprobs, ref_logprobs, rewards, baseline, mask, beta: float = 0.1) -> torch.Tensor:
    """Per-response ``[B]``: (βΔ − (R − b))²."""
    z = beta * sequence_logratio(logprobs, ref_logprobs, mask)
    return (z - (rewards - baseline)) ** 2


def kl_estimate(logprobs, ref_logprobs, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL(π‖π0) estimate on the sampled tokens, with d = log π0 − log π.

    k1 = −d, k2 = d²/2, k3 = e^d − d − 1 (≥ 0, the low-variance form).
    """
    d = ref_logprobs - logprobs
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.exp(d) - d - 1
    raise ValueError(f"kl_estimator must be k1, k2 or k3, got {estimator!r}")


def kl_trust_mask(logprobs, anchor_logprobs, pull, clip: float = 0.2) -> torch.Tensor:
    """1 for tokens the KL may still move, 0 for those outside [1−ε, 1+ε] in the pull's direction.

    ``pull`` > 0 where the KL raises the sampled token's probability (the teacher gives it more
    mass than the student), < 0 where it lowers it.
    """
    ratio = torch.exp(logprobs - anchor_logprobs).detach()
    out = ((ratio > 1 + clip) & (pull > 0)) | ((ratio < 1 - clip) & (pull < 0))
    return (~out).float()


def response_mean(a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each response's mean over its tokens: ``[B]``."""
    return (a * mask).sum(1) / mask.sum(1).clamp(min=1)


def group_mean(values: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Each row's group mean of ``values`` ``[B]`` (rows of one prompt form a group): ``[B]``."""
    n = int(group.max()) + 1 if group.numel() else 0
    sums = torch.zeros(n, dtype=values.dtype).index_add_(0, group, values)
    counts = torch.zeros(n, dtype=values.dtype).index_add_(0, group, torch.ones_like(values))
    return (sums / counts.clamp(min=1))[group]


def mixed_groups(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: the row's prompt has responses of different rewards (reward information)."""
    mean = group_mean(rewards.double(), group)
    spread = group_mean((rewards.double() - mean) ** 2, group)
    return spread > 0


CENTERS = ("none", "response", "group")


def process_signal(signal, mask, rewards, scale: float = 1.0, clip: float | None = None, center: str = "none",
                   gating: str = "none", group: torch.Tensor | None = None) -> torch.Tensor:
    """Post-processing of a per-token signal, in this order: scale, clip to ±c, centering, outcome
    gating (reward-0 responses: ``drop`` → 0, ``negate`` → −a; reward-1 kept).

    ``center``: ``"response"`` subtracts each response's mean (what is left is which of its tokens
    the teacher preferred: the response's overall level, where the outcome shows, is removed);
    ``"group"`` subtracts the mean over the responses of the same prompt (``group``) of their
    means, which keeps both the differences between a prompt's responses and those between the
    tokens of a response.
    """
    if center is True or center is False:  # configs written before the modes had names
        center = "response" if center else "none"
    a = signal * scale
    if clip is not None:
        a = a.clamp(-clip, clip)
    a = a * mask
    if center == "response":
        a = (a - response_mean(a, mask)[:, None]) * mask
    elif center == "group":
        if group is None:
            raise ValueError("center='group' needs the group (prompt) of each response")
        a = (a - group_mean(response_mean(a, mask), group)[:, None]) * mask
    elif center != "none":
        raise ValueError(f"center must be one of {CENTERS}, got {center!r}")
    if gating != "none":
        failed = (rewards <= 0)[:, None]
        if gating == "drop":
            a = torch.where(failed, torch.zeros_like(a), a)
        elif gating == "negate":
            a = torch.where(failed, -a, a)
        else:
            raise ValueError(f"gating must be none, drop or negate, got {gating!r}")
    return a


def standardize(signal, mask) -> torch.Tensor:
    """(a − mean) / std over the masked tokens (the ``combined`` strategy's per-teacher scale)."""
    vals = signal[mask]
    std = vals.std() if vals.numel() > 1 else vals.new_ones(())
    return ((signal - vals.mean()) / std.clamp(min=1e-8)) * mask
