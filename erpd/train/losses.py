"""Per-token (and per-response) losses of the two ERPD stages, in plain torch on log-probs.

Shapes: ``logprobs``, ``ref_logprobs`` (π0), ``anchor_logprobs``, ``signal``, ``mask`` are
``[B, T]`` (response tokens, ``mask`` False past each response's end); ``advantages``,
``rewards``, ``baseline`` are ``[B]``. Token-level functions return an unreduced ``[B, T]`` loss
and a dict of ``[B, T]`` indicator/value tensors for logging; the trainer masks and aggregates
(``erpd.train.engine.aggregate``). The ratio-shaping ones (``ppo``, ``sapo``, ``cispo`` and the
stage-2 clipped surrogate) are the pointwise forms that ``erpd.policy_loss`` also implements;
they live here so the trainer does not depend on that op, and can delegate to it unchanged.

Stage 1 (ratio r = π/π0 per token, Â the response's group-normalized advantage, DESIGN.md §1):

* ``ppo``: −min(r Â, clip(r, 1−ε_lo, 1+ε_hi) Â); ``clip_low``/``clip_high`` None drop that side
  ("loose": no ceiling lets rewarded tokens' probabilities run away — the extreme region).
* ``sapo``: −(4/τ) σ(τ (r − 1)) Â with τ = τ_pos for Â > 0, τ_neg otherwise (soft gate).
* ``cispo``: −sg(min(r, c)) Â log π (capped, detached importance weight on REINFORCE).
* ``ce``: −[R log σ(βΔ) + (1 − R) log(1 − σ(βΔ))], Δ = Σ_t log π/π0 over the response; our
  reading of the paper's "CE" objective: a classifier of the outcome whose logit is the scaled
  sequence log-ratio to the unlearned reference π0.
* ``mse``: (βΔ − (R − b))², b the group-mean reward; our reading of the paper's "MSE with an
  unlearned policy reference": regress the scaled log-ratio onto the centered reward.

Stage 2 (a_t the per-token distillation signal, ρ = π/π_anchor):

* surrogate: −min(ρ a, clip(ρ, 1−ε, 1+ε) a) for ``logratio``/``opd``/``combined`` signals;
* ``kl_trust_mask``: for the full-vocabulary KL signals, drop tokens already outside the trust
  region in the direction the KL pulls them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _clip_ratio(ratio: torch.Tensor, clip_low: float | None, clip_high: float | None) -> torch.Tensor:
    lo = None if clip_low is None else 1.0 - clip_low
    hi = None if clip_high is None else 1.0 + clip_high
    return ratio.clamp(min=lo, max=hi) if (lo is not None or hi is not None) else ratio


def ppo(logprobs, ref_logprobs, advantages, clip_low: float | None = 0.2, clip_high: float | None = 0.2):
    ratio = torch.exp(logprobs - ref_logprobs)
    adv = advantages[:, None]
    unclipped, clipped = ratio * adv, _clip_ratio(ratio, clip_low, clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    # A token is "clipped" when the clipped branch is the active one and has zero gradient.
    is_clipped = (clipped < unclipped).float()
    return loss, {"clip_frac": is_clipped, "ratio": ratio.detach()}


def sapo(logprobs, ref_logprobs, advantages, tau_pos: float = 1.0, tau_neg: float = 1.05):
    ratio = torch.exp(logprobs - ref_logprobs)
    adv = advantages[:, None]
    tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1.0))
    loss = -(4.0 / tau) * gate * adv
    # The gate's gradient weight 4σ(1−σ) falls below 1/2 once the token has left the soft region.
    soft_weight = 4 * gate * (1 - gate)
    return loss, {"clip_frac": (soft_weight < 0.5).float().detach(), "ratio": ratio.detach()}


def cispo(logprobs, ref_logprobs, advantages, cap: float = 5.0):
    ratio = torch.exp(logprobs - ref_logprobs)
    weight = ratio.clamp(max=cap).detach()
    loss = -weight * advantages[:, None] * logprobs
    return loss, {"clip_frac": (ratio > cap).float().detach(), "ratio": ratio.detach()}


def sequence_logratio(logprobs, ref_logprobs, mask) -> torch.Tensor:
    """Δ = Σ_t (log π − log π0) over each response: ``[B]``."""
    return ((logprobs - ref_logprobs) * mask).sum(1)


def ce(logprobs, ref_logprobs, rewards, mask, beta: float = 0.1):
    z = beta * sequence_logratio(logprobs, ref_logprobs, mask)
    # R log σ(z) + (1−R) log(1−σ(z)) written with logsigmoid for stability at large |z|.
    loss = -(rewards * F.logsigmoid(z) + (1 - rewards) * F.logsigmoid(-z))
    return loss, {"seq_logit": z.detach()}


def mse(logprobs, ref_logprobs, rewards, baseline, mask, beta: float = 0.1):
    z = beta * sequence_logratio(logprobs, ref_logprobs, mask)
    loss = (z - (rewards - baseline)) ** 2
    return loss, {"seq_logit": z.detach()}


def kl_penalty(logprobs, ref_logprobs, estimator: str = "k3") -> torch.Tensor:
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


def surrogate(logprobs, anchor_logprobs, signal, clip: float = 0.2):
    """−min(ρ a, clip(ρ, 1−ε, 1+ε) a), ρ = π/π_anchor: PPO's clipped loss with the (detached)
    distillation signal ``a`` in place of the advantage; the trust region is anchored at π_anchor."""
    ratio = torch.exp(logprobs - anchor_logprobs)
    a = signal.detach()
    unclipped, clipped = ratio * a, ratio.clamp(1 - clip, 1 + clip) * a
    return -torch.minimum(unclipped, clipped), {"clip_frac": (clipped < unclipped).float(), "ratio": ratio.detach()}


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
