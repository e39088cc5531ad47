"""Ground truth for every erpd op: plain PyTorch that materializes the logits.

Each function here is the definition the fused backends are tested against. They compute in
float64 when given float64 inputs and in float32 otherwise (never in bf16/fp16: the fused
backends accumulate in float32 too), and they are differentiable through ordinary autograd.
They are also the `backend="torch"` implementation of the public ops.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from erpd.ops import policy_spec
from erpd.ops.options import PolicyOptions


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``x @ w.T + b`` in the accumulation dtype of ``x``, also under ``torch.autocast`` (the public
    ops have already cast their inputs as autocast would)."""
    acc, device = _acc_dtype(x), x.device.type
    with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else contextlib.nullcontext():
        return F.linear(x.to(acc), w.to(acc), None if b is None else b.to(acc))


def logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    r"""The logits every op scores, in the accumulation dtype: with :math:`y = W h + b`, scale
    :math:`s` and temperature :math:`\tau`, :math:`z = s y / \tau`, or with softcapping
    :math:`c` (Gemma's ``final_logit_softcapping``) :math:`z = c \tanh(s y / c) / \tau`."""
    y = _linear(hidden, weight, bias)
    if softcap is not None:
        return softcap * torch.tanh(y * (logit_scale / softcap)) / temperature
    return y * (logit_scale / temperature)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Per-token log-probability of ``targets`` (and entropy) under ``softmax((hidden @ weight.T + bias) / temperature)``
    (:func:`logits`: with ``logit_scale`` and ``softcap`` applied before the temperature).

    For a row with logits :math:`z = (W h + b)/\tau \in \mathbb{R}^V` and target :math:`y`:

    .. math::
        \mathrm{lse} = \log \sum_k e^{z_k}, \qquad
        \log p_y = z_y - \mathrm{lse}, \qquad
        H = -\sum_k p_k \log p_k = \mathrm{lse} - \sum_k p_k z_k .

    Rows whose target equals ``ignore_index`` give 0 for both outputs and get no gradient.

    Shapes: ``hidden [..., H]``, ``weight [V, H]``, ``bias [V]``, ``targets [...]``; outputs ``[...]``.
    """
    logp_all = torch.log_softmax(logits(hidden, weight, bias, temperature, logit_scale, softcap), dim=-1)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    logp = logp_all.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    zero = logp.new_zeros(())
    logp = torch.where(valid, logp, zero)
    entropy = None
    if with_entropy:
        entropy = -expect(logp_all, logp_all)
        entropy = torch.where(valid, entropy, zero)
    return logp, entropy


def linear_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> dict[str, torch.Tensor]:
    r"""The per-token fields of TRL's fused LM head (``FusedCausalLMOutput``) from the :func:`logits`
    :math:`z` of each row: ``logprobs`` and ``entropy`` (differentiable), and, without gradient,
    ``log_sum_sq_probs`` :math:`= \log \sum_k p_k^2`, ``mean_logits`` :math:`= \frac{1}{V}\sum_k z_k`
    and ``is_top1`` (bool: the target is ``argmax z``, the first maximal index, so a tie with an
    earlier token does not count). Rows whose target is ``ignore_index`` give 0 / False."""
    z = logits(hidden, weight, bias, temperature, logit_scale, softcap)
    logq = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    zero = logq.new_zeros(())
    logp = torch.where(valid, logq.gather(-1, safe.unsqueeze(-1)).squeeze(-1), zero)
    entropy = torch.where(valid, -expect(logq, logq), zero)
    with torch.no_grad():
        log_sum_sq = torch.where(valid, torch.logsumexp(2 * logq, dim=-1), zero)
        mean = torch.where(valid, z.mean(-1), zero)
        top1 = valid & (z.argmax(-1) == safe)
    return dict(logprobs=logp, entropy=entropy, log_sum_sq_probs=log_sum_sq, mean_logits=mean, is_top1=top1)


KL_DIRECTIONS = ("forward", "reverse", "jsd")
# Floor of the tail masses of the top-k teacher form (1 - sum of the top-k probabilities).
TOPK_TAIL_EPS = 1e-12


def expect(logp: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    r""":math:`\sum_k p_k x_k` over the last dim, :math:`p = e^{\mathrm{logp}}`, where a zero-probability
    token adds 0 whatever its ``x`` (a -inf logit gives log-prob -inf and x = ±inf or NaN there:
    :math:`0 \cdot \infty` must not make the sum, or its gradient, NaN)."""
    p = logp.exp()
    return (p * torch.where(p > 0, x, torch.zeros((), dtype=x.dtype, device=x.device))).sum(-1)


def _kl_rows(logq_s: torch.Tensor, logq_t: torch.Tensor, direction: str, beta: float) -> torch.Tensor:
    """Per-row divergence between two log-distributions over the last dim (student, teacher)."""
    if direction == "jsd" and beta == 0.0:
        direction = "forward"
    elif direction == "jsd" and beta == 1.0:
        direction = "reverse"
    if direction == "forward":
        return expect(logq_t, logq_t - logq_s)
    if direction == "reverse":
        return expect(logq_s, logq_s - logq_t)
    # Mixture M = (1 - beta) S + beta T, in log space. Where both are 0, M is too and neither
    # term counts: feed logaddexp finite stand-ins there (its gradient at (-inf, -inf) is NaN).
    dead = (logq_s == -math.inf) & (logq_t == -math.inf)
    zero = torch.zeros((), dtype=logq_s.dtype, device=logq_s.device)
    log_m = torch.logaddexp(torch.where(dead, zero, logq_s) + math.log1p(-beta),
                            torch.where(dead, zero, logq_t) + math.log(beta))
    kl_t = expect(logq_t, logq_t - log_m)
    kl_s = expect(logq_s, logq_s - log_m)
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
    logits = _linear(hidden, weight, bias)
    if teacher_topk is None and teacher_logits is None:
        teacher_logits = _linear(teacher_hidden.to(logits.dtype), teacher_weight, teacher_bias)
    kl = kl_from_logits(logits, teacher_logits, teacher_topk, direction=direction, beta=beta, temperature=temperature)
    # A divergence is >= 0, but rounding leaves ~-1e-10 where the distributions coincide: clamp the
    # value as the fused kernels do, keeping the unclamped gradient (theirs too); NaN stays NaN
    # and +inf stays +inf (clamp(kl) - kl would be inf - inf there).
    kl = kl + torch.where(kl < 0, -kl, torch.zeros((), dtype=kl.dtype, device=kl.device)).detach()
    if targets is not None:
        kl = torch.where(targets != ignore_index, kl, kl.new_zeros(()))
    return kl



# --------------------------------------------------------------------------------------------
# policy losses
# --------------------------------------------------------------------------------------------

# The option names, in the order of their kernel codes (the table: erpd/ops/policy_spec.py).
POLICY_METHODS = tuple(policy_spec.METHOD_CODES)
POLICY_AGGS = tuple(policy_spec.AGG_CODES)
KL_ESTIMATORS = tuple(policy_spec.KL_ESTIMATOR_CODES)
# Every exp() of a log-ratio takes it clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] (as verl and
# OpenRLHF do), so a single runaway token cannot overflow float32; the ratio's gradient is 0 there.
LOG_RATIO_CLAMP = 20.0


def policy_agg_count(
    mask: torch.Tensor, agg: str = "token-mean", num_items: float | torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The count :func:`policy_agg_weights` divides by (N or B' in its table), a 0-dim tensor:
    ``num_items`` if given, else the valid tokens (token-mean) or the rows; clamped below at 1,
    NaN for a NaN or infinite ``num_items``."""
    if num_items is None:
        if agg == "token-mean":
            return (mask != 0).to(dtype).sum().clamp_min(1.0)
        return torch.tensor(float(mask.shape[0]), dtype=dtype, device=mask.device)
    count = torch.as_tensor(num_items, dtype=dtype, device=mask.device)
    return torch.where(count.isfinite(), count.clamp_min(1.0), torch.nan)


def policy_agg_weights(
    mask: torch.Tensor,
    agg: str = "token-mean",
    num_items: float | torch.Tensor | None = None,
    norm_length: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    r"""Aggregation weights ``w [B, T]`` of :func:`policy_loss`: the loss is ``sum(w * per_token)``.

    With :math:`m` the 0/1 mask, :math:`L_b = \sum_t m_{bt}` the length of sequence b and
    :math:`B` the number of rows:

    ==========================  ==================================  ==============================
    ``agg``                     :math:`w_{bt}`                      count ``num_items`` replaces
    ==========================  ==================================  ==============================
    token-mean                  :math:`m_{bt} / N`                  :math:`N = \sum m` (tokens)
    seq-mean-token-mean         :math:`m_{bt} / (B' L_b)`           :math:`B' = B` (sequences)
    seq-mean-token-sum          :math:`m_{bt} / B'`                 :math:`B' = B`
    seq-mean-token-sum-norm     :math:`m_{bt} / (B' \cdot T_n)`     :math:`B' = B`
    ==========================  ==================================  ==============================

    ``num_items`` is the count over the whole optimizer step (all gradient-accumulation
    micro-batches, all ranks), so that the micro-batch losses sum to the one-batch loss. ``T_n``
    is ``norm_length`` (Dr. GRPO's constant, e.g. the maximum completion length), by default the
    padded length T. Counts (N, B', L_b) are clamped below at 1: an all-masked batch or sequence
    gives weight 0, not NaN. So is ``num_items`` (the ops refuse a number <= 0, and a tensor <= 0
    where their value checks run), except that a NaN or infinite ``num_items`` gives NaN weights:
    the one rule every backend follows for a value nothing checked.
    """
    m = (mask != 0).to(dtype)
    T = m.shape[1]
    count = policy_agg_count(mask, agg, num_items, dtype)
    if agg == "token-mean":
        return m / count
    if agg == "seq-mean-token-mean":
        return m / (count * m.sum(1, keepdim=True).clamp_min(1.0))
    if agg == "seq-mean-token-sum":
        return m / count
    if agg == "seq-mean-token-sum-norm":
        return m / (count * float(T if norm_length is None else norm_length))
    raise ValueError(f"agg must be one of {POLICY_AGGS}, got {agg!r}")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    options: PolicyOptions | None = None,
    *,
    is_weights: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    num_items: float | torch.Tensor | None = None,
    **option_kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Token-level policy-gradient losses on ``[B, T]`` log-probs; returns ``(loss, metrics)``.

    The options (``method``, ``clip_low``, ...) are the fields of :class:`erpd.PolicyOptions`, given
    as ``options`` or as keyword arguments (which override it).

    Notation, per token (b, t) with mask :math:`m`: :math:`x` = ``logprobs`` (differentiable),
    :math:`x_{old}`, :math:`A` = advantage (``[B]`` broadcast over t, or ``[B, T]``),
    :math:`\delta = \mathrm{clamp}(x - x_{old}, \pm 20)`, token ratio :math:`r = e^{\delta}`,
    :math:`\mathrm{sg}` = stop-gradient.

    Per-token policy loss :math:`\ell`:

    * ``ppo``: :math:`\ell = \max(-A r,\ -A\,\mathrm{clip}(r, 1-\epsilon_{lo}, 1+\epsilon_{hi}))`
      (``clip_low``, ``clip_high``; clip-higher when :math:`\epsilon_{hi} > \epsilon_{lo}`).
      With ``dual_clip`` c > 1, for A < 0: :math:`\ell = \min(\ell, -c A)` (the gradient
      vanishes once r > c).
    * ``sapo``: :math:`\ell = -A \frac{4}{\tau}\sigma(\tau (r - 1))`, :math:`\tau` =
      ``tau_pos`` if A > 0 else ``tau_neg``. Its gradient :math:`-4\sigma(1-\sigma) r A\,\nabla x`
      is the plain policy gradient at r = 1 and decays smoothly away from it (SAPO, arXiv
      2511.20347).
    * ``cispo``: :math:`\ell = -\mathrm{sg}(\mathrm{clip}(r, f, c))\,A\,x` with c = ``cispo_cap``
      (an absolute cap on r, as TRL and ScaleRL use it) and f = ``cispo_floor`` (None: no floor,
      the one-sided form; verl's two-sided form is ``cispo_floor=1-ε_lo, cispo_cap=1+ε_hi``).
    * ``reinforce``: :math:`\ell = -\mathrm{sg}(w)\,A\,x`, :math:`w = \min(r, C)` with C =
      ``reinforce_cap`` (truncated importance sampling; None: no truncation). With
      ``old_logprobs = logprobs.detach()`` this is plain REINFORCE, :math:`-A x`.
    * ``gspo``: the ppo loss (with its clip and dual clip) on the sequence ratio
      :math:`s_b = \exp(\mathrm{clamp}(\sum_t m\,(x - x_{old}) / L_b, \pm 20))`, the geometric mean
      of the token ratios, applied to every token of the sequence: :math:`\ell_{bt} = \ell(s_b)`.
      The gradient flows through :math:`s_b` into every token of the sequence.

    Total loss, with aggregation weights :math:`w` from :func:`policy_agg_weights` (they depend
    only on ``mask``, ``agg``, ``num_items`` and ``norm_length``), optional detached per-token
    ``is_weights`` :math:`\rho` (rollout correction; 1 if None) multiplying the policy term only:

    .. math::
        L = \sum_{b,t} w_{bt} \left[\rho_{bt}\,\ell_{bt} + \beta\,k_{bt} - \gamma\,H_{bt}\right]

    with :math:`\beta` = ``kl_coef``, :math:`\gamma` = ``entropy_coef``, :math:`H` = ``entropy``
    (differentiable, if given), and the ``kl_estimator`` of KL(π‖π_ref) from ``ref_logprobs``
    :math:`x_{ref}`, with :math:`d = x_{ref} - x`: ``k1`` :math:`= -d`, ``k2`` :math:`= d^2/2`,
    ``k3`` :math:`= e^{d} - d - 1` (d clamped to ±20). With ``kl_ratio_weighted`` the KL term is
    :math:`r\,k` with the ratio of the loss (token :math:`r`, or :math:`s_b` for gspo),
    differentiable: the importance-weighted KL of DeepSeek-V3.2, whose gradient is the unbiased
    gradient of KL(π‖π_ref) on samples from π_old (TRL's and Liger's ``use_bias_correction_kl``);
    ``kl_ref`` then reports the mean of :math:`r\,k`.

    Tokens with mask 0 contribute nothing and get zero gradient, whatever their values (NaN
    included). ``metrics`` (detached 0-dim tensors; means over valid tokens of this batch):
    ``pg_loss`` (the :math:`\rho\ell` term, aggregated like the loss), ``clipfrac_low`` (A < 0
    and r below the lower bound: ppo/gspo 1-ε_lo, cispo the floor), ``clipfrac_high`` (A > 0
    and r above the upper bound: ppo/gspo 1+ε_hi, cispo/reinforce the cap), ``clipfrac``
    (their sum), ``ratio_mean/min/max`` (of the ratio the loss uses: r, or s_b for gspo;
    1 when no token is valid), ``approx_kl`` (mean of :math:`(r-1) - \log r`, the k3 estimate of
    KL(π_old‖π) with token ratios), ``num_valid`` (the count of valid tokens those means are
    over, so that a caller can sum metrics over micro-batches), and when given ``kl_ref`` (mean
    of k) and ``entropy``. ``clip_low = 1`` puts the ratio floor at 0 (no floor) and
    ``clip_high = inf`` removes the ceiling.
    """
    o = PolicyOptions.of(options, "erpd.reference.policy_loss", **option_kwargs)
    method, agg, clip_low, clip_high, dual_clip = o.method, o.agg, o.clip_low, o.clip_high, o.dual_clip
    tau_pos, tau_neg, cispo_cap, cispo_floor, reinforce_cap = o.tau_pos, o.tau_neg, o.cispo_cap, o.cispo_floor, o.reinforce_cap
    kl_coef, kl_estimator, kl_ratio_weighted = o.kl_coef, o.kl_estimator, o.kl_ratio_weighted
    entropy_coef, norm_length = o.entropy_coef, o.norm_length
    acc = _acc_dtype(logprobs)
    valid = mask != 0
    B, T = logprobs.shape
    zero = torch.zeros((), dtype=acc, device=logprobs.device)
    # Select before any arithmetic, so padding values (NaN, -inf) never reach a gradient.
    x = torch.where(valid, logprobs.to(acc), zero)
    x_old = torch.where(valid, old_logprobs.detach().to(acc), zero)
    adv = advantages.detach().to(acc)
    adv = torch.where(valid, adv[:, None].expand(B, T) if adv.dim() == 1 else adv, zero)
    w = policy_agg_weights(mask, agg, num_items, norm_length, dtype=acc)
    m = valid.to(acc)
    n_valid = m.sum()
    clip_high = clip_low if clip_high is None else clip_high
    lim = LOG_RATIO_CLAMP

    log_r_tok = (x - x_old).clamp(-lim, lim)
    r_tok = log_r_tok.exp()
    if method == "gspo":
        seq_log_r = ((x - x_old) * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1.0)
        ratio = seq_log_r.clamp(-lim, lim).exp().expand(B, T)
    else:
        ratio = r_tok

    if method in ("ppo", "gspo"):
        lo, hi = 1.0 - clip_low, 1.0 + clip_high
        per_tok = torch.maximum(-adv * ratio, -adv * ratio.clamp(lo, hi))
        if dual_clip is not None:
            per_tok = torch.where(adv < 0, torch.minimum(per_tok, -dual_clip * adv), per_tok)
        clip_lo, clip_hi = (ratio < lo) & (adv < 0), (ratio > hi) & (adv > 0)
    elif method == "sapo":
        tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
        per_tok = -adv * (4.0 / tau) * torch.sigmoid(tau * (ratio - 1.0))
        clip_lo = clip_hi = torch.zeros_like(valid)
    elif method in ("cispo", "reinforce"):
        lo = (0.0 if cispo_floor is None else cispo_floor) if method == "cispo" else 0.0
        hi = cispo_cap if method == "cispo" else (math.inf if reinforce_cap is None else reinforce_cap)
        weight = ratio.detach().clamp(lo, hi)
        per_tok = -weight * adv * x
        clip_lo, clip_hi = (ratio < lo) & (adv < 0), (ratio > hi) & (adv > 0)
    else:
        raise ValueError(f"method must be one of {POLICY_METHODS}, got {method!r}")

    rho = None if is_weights is None else torch.where(valid, is_weights.detach().to(acc), zero)
    pg_tok = per_tok if rho is None else rho * per_tok
    pg_loss = (w * pg_tok).sum()
    loss = pg_loss

    def token_mean(v):
        return (v * m).sum() / n_valid.clamp_min(1.0)

    metrics = {"pg_loss": pg_loss.detach()}
    ratio_v = torch.where(valid, ratio.detach(), zero)
    any_valid = n_valid > 0
    one = torch.ones((), dtype=acc, device=logprobs.device)
    metrics.update(
        clipfrac_low=token_mean(clip_lo.to(acc)),
        clipfrac_high=token_mean(clip_hi.to(acc)),
    )
    metrics["clipfrac"] = metrics["clipfrac_low"] + metrics["clipfrac_high"]
    metrics.update(
        ratio_mean=token_mean(ratio_v),
        # The extra ±inf entry keeps amin/amax defined on an empty batch; `where` then reports 1.
        ratio_min=torch.where(any_valid, torch.cat([torch.where(valid, ratio_v, math.inf).flatten(), one.view(1) * math.inf]).amin(), one),
        ratio_max=torch.where(any_valid, torch.cat([torch.where(valid, ratio_v, -math.inf).flatten(), one.view(1) * -math.inf]).amax(), one),
        approx_kl=token_mean((r_tok - 1.0 - log_r_tok).detach()),
        num_valid=n_valid,
    )

    if ref_logprobs is not None:
        x_ref = torch.where(valid, ref_logprobs.detach().to(acc), zero)
        d = x_ref - x
        if kl_estimator == "k1":
            kl = -d
        elif kl_estimator == "k2":
            kl = 0.5 * d * d
        elif kl_estimator == "k3":
            d = d.clamp(-lim, lim)
            kl = d.exp() - d - 1.0
        else:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
        if kl_ratio_weighted:
            kl = kl * ratio
        if kl_coef != 0.0:
            loss = loss + kl_coef * (w * kl).sum()
        metrics["kl_ref"] = token_mean(kl.detach())
    if entropy is not None:
        ent = torch.where(valid, entropy.to(acc), zero)
        if entropy_coef != 0.0:
            loss = loss - entropy_coef * (w * ent).sum()
        metrics["entropy"] = token_mean(ent.detach())
    return loss, {k: v.detach() for k, v in metrics.items()}
