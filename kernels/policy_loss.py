r"""Policy losses in Triton: per-token loss, its gradient w.r.t. the log-prob, and the metrics, in one pass.

Math (erpd.reference.policy_loss is the definition; csrc/policy_loss/math.h is the C++ twin). Per
valid token with log-prob x, old log-prob x_old, advantage A and delta = x - x_old:

    log r = clamp(delta, +-20)                  (gspo: the row's clamp(mean_t m delta, +-20))
    ppo/gspo   l = max(-A r, -A clip(r, lo, hi)),  A < 0 and dual clip c: l = min(l, -c A)
               dl/dlog r = -A r where the unclipped branch is the max (and below c), else 0
    sapo       l = -A (4/tau) s,  s = sigmoid(tau (r - 1)),  dl/dlog r = -4 A s (1 - s) r
    cispo /    l = -sg(clip(r, lo, hi)) A x,  dl/dx = -clip(r, lo, hi) A
    reinforce
    KL, d = x_ref - x: k1 = -d (dk/dx = 1), k2 = d^2/2 (-d), k3 = e^d - d - 1 (1 - e^d; d clamped to +-20)
    KL_RATIO: the KL term is r k (r the loss's ratio, differentiable): d(r k)/dx = r dk/dx + r k,
               the second part through gspo's s_b for gspo (into the row's sequence gradient)

The loss is sum_t m_t f_b / D [rho_t l_t + kl_coef k_t - entropy_coef H_t], with f_b = 1/L_b
for seq-mean-token-mean (L_b = valid tokens of row b) and 1 otherwise, and D the batch
normaliser. gspo's gradient reaches every token of a row through its sequence ratio s_b:
dL/dx_t = m_t f_b / D * (sum_t' m rho dl_t'/dlog s) / L_b.

Layout. `_policy_loss_fwd_kernel` runs one program per row (sequence), BLOCK_T tokens at a time:
a first pass for the row's length (and gspo's mean log-ratio) when the method or aggregation
needs it, then the per-token pass, which writes dL/dx (and dL/dH) *without* 1/D and row
partial sums; gspo adds a third pass writing its sequence-level gradient. D can need the whole
batch's token count, which no row program has, so `_policy_loss_finalize_kernel` (one program)
reduces the [B, NUM_PARTS] partials, computes D, and writes the loss, 1/D and the metrics; the
autograd backward scales the saved gradients by grad_output / D. Two launches per call, no host
synchronization. Everything accumulates in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from erpd.kernels._launch import on_device
from erpd.ops import policy_spec as _spec

__all__ = ["policy_loss_fwd", "NUM_STATS"]

# The codes of method / agg / kl_estimator and the order of `stats`: erpd/ops/policy_spec.py.
PPO, SAPO, CISPO, GSPO, REINFORCE = (_spec.METHOD_CODES[m] for m in ("ppo", "sapo", "cispo", "gspo", "reinforce"))
TOKEN_MEAN, SEQ_MEAN_TOKEN_MEAN, SEQ_MEAN_TOKEN_SUM, SEQ_MEAN_TOKEN_SUM_NORM = (
    _spec.AGG_CODES[a] for a in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
)
K1, K2, K3 = (_spec.KL_ESTIMATOR_CODES[k] for k in ("k1", "k2", "k3"))
# Row partials: weighted sums (policy, kl, entropy), count, clip counts, ratio sum/min/max,
# approx-kl sum, kl sum, entropy sum.
NUM_PARTS = 12
NUM_STATS = _spec.NUM_STATS
LOG_RATIO_CLAMP = 20.0

# The same, as the constexpr globals that a @triton.jit function may read.
_PPO, _SAPO, _GSPO = tl.constexpr(PPO), tl.constexpr(SAPO), tl.constexpr(GSPO)
_TOKEN_MEAN, _SEQ_MEAN_TOKEN_MEAN = tl.constexpr(TOKEN_MEAN), tl.constexpr(SEQ_MEAN_TOKEN_MEAN)
_K1, _K2 = tl.constexpr(K1), tl.constexpr(K2)
# The finalize kernel writes every entry of `stats`, each at its index in the table.
_STATS_WRITTEN = (
    "inv_norm", "pg_loss", "clipfrac_low", "clipfrac_high", "clipfrac", "ratio_mean", "ratio_min", "ratio_max",
    "approx_kl", "kl_ref", "entropy", "num_valid",
)
if sorted(_STATS_WRITTEN) != sorted(_spec.STAT_NAMES):
    raise ImportError("_policy_loss_finalize_kernel must write every stat of erpd/ops/policy_spec.py")
(_S_INV_NORM, _S_PG_LOSS, _S_CLIPFRAC_LOW, _S_CLIPFRAC_HIGH, _S_CLIPFRAC, _S_RATIO_MEAN, _S_RATIO_MIN, _S_RATIO_MAX,
 _S_APPROX_KL, _S_KL_REF, _S_ENTROPY, _S_NUM_VALID) = (tl.constexpr(_spec.STAT_INDEX[n]) for n in _STATS_WRITTEN)


@triton.jit
def _token_terms(
    x, x_old, adv, x_ref, seq_log_r, lo, hi, dual_clip, tau_pos, tau_neg,
    METHOD: tl.constexpr, KL_EST: tl.constexpr, HAS_REF: tl.constexpr, HAS_DUAL: tl.constexpr,
    KL_RATIO: tl.constexpr, CLAMP: tl.constexpr,
):
    """(l, dl, ratio, approx_kl, clip_low, clip_high, k, dk, dk_seq) of a block of tokens (see the
    module docstring); dk_seq is gspo's d(s k)/dlog s with KL_RATIO, else 0."""
    delta = x - x_old
    log_rt = tl.minimum(tl.maximum(delta, -CLAMP), CLAMP)
    rt = tl.exp(log_rt)
    approx_kl = (rt - 1.0) - log_rt
    if METHOD == _GSPO:  # the row's sequence ratio
        raw = seq_log_r + tl.zeros_like(delta)
        r = tl.exp(tl.minimum(tl.maximum(raw, -CLAMP), CLAMP))
    else:
        raw = delta
        r = rt
    passes = (raw >= -CLAMP) & (raw <= CLAMP)
    if METHOD == _PPO or METHOD == _GSPO:
        u1 = -adv * r
        u2 = -adv * tl.minimum(tl.maximum(r, lo), hi)
        pol = tl.maximum(u1, u2)
        d = tl.where((u1 >= u2) & passes, -adv * r, 0.0)
        if HAS_DUAL:
            hit = (adv < 0) & (pol > -dual_clip * adv)
            pol = tl.where(hit, -dual_clip * adv, pol)
            d = tl.where(hit, 0.0, d)
        clip_lo = (adv < 0) & (r < lo)
        clip_hi = (adv > 0) & (r > hi)
    elif METHOD == _SAPO:
        tau = tl.where(adv > 0, tau_pos, tau_neg)
        s = tl.sigmoid(tau * (r - 1.0))
        pol = -adv * (4.0 / tau) * s
        d = tl.where(passes, -4.0 * adv * s * (1.0 - s) * r, 0.0)
        clip_lo = tl.zeros_like(adv) > 1.0  # sapo has no clip: all False
        clip_hi = clip_lo
    else:  # cispo, reinforce: a detached, clipped weight on -A x
        w = tl.minimum(tl.maximum(r, lo), hi)
        pol = -w * adv * x
        d = -w * adv
        clip_lo = (adv < 0) & (r < lo)
        clip_hi = (adv > 0) & (r > hi)
    if HAS_REF:
        dd = x_ref - x
        if KL_EST == _K1:
            kl = -dd
            dkl = tl.full(dd.shape, 1.0, tl.float32)
        elif KL_EST == _K2:
            kl = 0.5 * dd * dd
            dkl = -dd
        else:
            dc = tl.minimum(tl.maximum(dd, -CLAMP), CLAMP)
            e = tl.exp(dc)
            kl = e - dc - 1.0
            dkl = tl.where((dd >= -CLAMP) & (dd <= CLAMP), 1.0 - e, 0.0)
    else:
        kl = tl.zeros_like(delta)
        dkl = kl
    dkl_seq = tl.zeros_like(delta)
    if KL_RATIO:
        rk = tl.where(passes, r * kl, 0.0)
        if METHOD == _GSPO:
            dkl = r * dkl
            dkl_seq = rk
        else:
            dkl = r * dkl + rk
        kl = r * kl
    return pol, d, r, approx_kl, clip_lo, clip_hi, kl, dkl, dkl_seq


@triton.jit
def _policy_loss_fwd_kernel(
    lp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, ent_ptr, isw_ptr,
    glp_ptr, gent_ptr, part_ptr,
    T, lo, hi, dual_clip, tau_pos, tau_neg, kl_coef, ent_coef,
    METHOD: tl.constexpr, AGG: tl.constexpr, KL_EST: tl.constexpr,
    HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr, HAS_ISW: tl.constexpr, HAS_DUAL: tl.constexpr,
    KL_RATIO: tl.constexpr, NEED_GENT: tl.constexpr, ADV_PER_ROW: tl.constexpr, BLOCK_T: tl.constexpr,
):
    CLAMP: tl.constexpr = 20.0
    GSPO_: tl.constexpr = METHOD == _GSPO
    b = tl.program_id(0)
    base = b.to(tl.int64) * T
    ar = tl.arange(0, BLOCK_T)

    # Pass 1: the row's length (seq-mean-token-mean, gspo) and mean log-ratio (gspo).
    length = 0.0
    sum_delta = 0.0
    if AGG == _SEQ_MEAN_TOKEN_MEAN or GSPO_:
        for t0 in range(0, T, BLOCK_T):
            offs = t0 + ar
            inb = offs < T
            valid = tl.load(mask_ptr + base + offs, mask=inb, other=0) != 0
            length += tl.sum(valid.to(tl.float32), axis=0)
            if GSPO_:
                x = tl.load(lp_ptr + base + offs, mask=inb, other=0.0)
                x_old = tl.load(old_ptr + base + offs, mask=inb, other=0.0)
                sum_delta += tl.sum(tl.where(valid, x - x_old, 0.0), axis=0)
    if AGG == _SEQ_MEAN_TOKEN_MEAN:
        f = 1.0 / tl.maximum(length, 1.0)
    else:
        f = 1.0
    seq_log_r = sum_delta / tl.maximum(length, 1.0)
    if ADV_PER_ROW:
        adv_row = tl.load(adv_ptr + b)

    # Pass 2: per-token terms; per-lane accumulators, reduced once at the end.
    zero = tl.zeros((BLOCK_T,), tl.float32)
    a_pol = zero
    a_kl = zero
    a_ent = zero
    a_n = zero
    a_clo = zero
    a_chi = zero
    a_r = zero
    a_rmin = zero + float("inf")
    a_rmax = zero - float("inf")
    a_akl = zero
    a_k = zero
    a_h = zero
    a_gseq = zero
    for t0 in range(0, T, BLOCK_T):
        offs = t0 + ar
        inb = offs < T
        valid = tl.load(mask_ptr + base + offs, mask=inb, other=0) != 0
        # Padding values (NaN, -inf) never reach arithmetic that a valid token reads.
        x = tl.where(valid, tl.load(lp_ptr + base + offs, mask=inb, other=0.0), 0.0)
        x_old = tl.where(valid, tl.load(old_ptr + base + offs, mask=inb, other=0.0), 0.0)
        if ADV_PER_ROW:
            adv = tl.where(valid, adv_row, 0.0)
        else:
            adv = tl.where(valid, tl.load(adv_ptr + base + offs, mask=inb, other=0.0), 0.0)
        if HAS_REF:
            x_ref = tl.where(valid, tl.load(ref_ptr + base + offs, mask=inb, other=0.0), 0.0)
        else:
            x_ref = zero
        pol, d, r, akl, clo, chi, kl, dkl, dkl_seq = _token_terms(
            x, x_old, adv, x_ref, seq_log_r, lo, hi, dual_clip, tau_pos, tau_neg,
            METHOD, KL_EST, HAS_REF, HAS_DUAL, KL_RATIO, CLAMP,
        )
        if HAS_ISW:
            rho = tl.where(valid, tl.load(isw_ptr + base + offs, mask=inb, other=0.0), 0.0)
        else:
            rho = zero + 1.0
        if HAS_ENT:
            h = tl.where(valid, tl.load(ent_ptr + base + offs, mask=inb, other=0.0), 0.0)
        else:
            h = zero
        vf = valid.to(tl.float32)
        a_pol += tl.where(valid, rho * pol, 0.0)
        a_kl += tl.where(valid, kl, 0.0)
        a_ent += h
        a_n += vf
        a_clo += tl.where(valid & clo, 1.0, 0.0)
        a_chi += tl.where(valid & chi, 1.0, 0.0)
        a_r += tl.where(valid, r, 0.0)
        a_rmin = tl.minimum(a_rmin, tl.where(valid, r, float("inf")))
        a_rmax = tl.maximum(a_rmax, tl.where(valid, r, -float("inf")))
        a_akl += tl.where(valid, akl, 0.0)
        a_k += tl.where(valid, kl, 0.0)
        a_h += h
        g = kl_coef * dkl
        if GSPO_:
            a_gseq += tl.where(valid, rho * d + kl_coef * dkl_seq, 0.0)
        else:
            g += rho * d
        tl.store(glp_ptr + base + offs, tl.where(valid, f * g, 0.0), mask=inb)
        if NEED_GENT:
            tl.store(gent_ptr + base + offs, tl.where(valid, -ent_coef * f, 0.0), mask=inb)

    if GSPO_:
        # Pass 3: every token of the row gets the sequence ratio's share of the gradient.
        g_seq = f * tl.sum(a_gseq, axis=0) / tl.maximum(length, 1.0)
        for t0 in range(0, T, BLOCK_T):
            offs = t0 + ar
            inb = offs < T
            valid = tl.load(mask_ptr + base + offs, mask=inb, other=0) != 0
            g = tl.load(glp_ptr + base + offs, mask=inb, other=0.0)
            tl.store(glp_ptr + base + offs, tl.where(valid, g + g_seq, 0.0), mask=inb)

    out = part_ptr + b.to(tl.int64) * 12
    tl.store(out + 0, f * tl.sum(a_pol, axis=0))
    tl.store(out + 1, f * tl.sum(a_kl, axis=0))
    tl.store(out + 2, f * tl.sum(a_ent, axis=0))
    tl.store(out + 3, tl.sum(a_n, axis=0))
    tl.store(out + 4, tl.sum(a_clo, axis=0))
    tl.store(out + 5, tl.sum(a_chi, axis=0))
    tl.store(out + 6, tl.sum(a_r, axis=0))
    tl.store(out + 7, tl.min(a_rmin, axis=0))
    tl.store(out + 8, tl.max(a_rmax, axis=0))
    tl.store(out + 9, tl.sum(a_akl, axis=0))
    tl.store(out + 10, tl.sum(a_k, axis=0))
    tl.store(out + 11, tl.sum(a_h, axis=0))


@triton.jit
def _policy_loss_finalize_kernel(
    part_ptr, loss_ptr, stats_ptr, num_items_ptr,
    B, num_items_value, norm_scale, kl_coef, ent_coef,
    AGG: tl.constexpr, NUM_ITEMS_FROM_PTR: tl.constexpr, BLOCK_B: tl.constexpr,
):
    cols = tl.arange(0, 16)
    col_ok = cols < 12
    s = tl.zeros((16,), tl.float32)
    mn = tl.full((16,), float("inf"), tl.float32)
    mx = tl.full((16,), -float("inf"), tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        ok = (rows < B)[:, None] & col_ok[None, :]
        v = tl.load(part_ptr + rows.to(tl.int64)[:, None] * 12 + cols[None, :], mask=ok, other=0.0)
        s += tl.sum(v, axis=0)
        mn = tl.minimum(mn, tl.min(tl.where(ok, v, float("inf")), axis=0))
        mx = tl.maximum(mx, tl.max(tl.where(ok, v, -float("inf")), axis=0))
    pol = tl.sum(tl.where(cols == 0, s, 0.0), axis=0)
    kl = tl.sum(tl.where(cols == 1, s, 0.0), axis=0)
    ent = tl.sum(tl.where(cols == 2, s, 0.0), axis=0)
    n = tl.sum(tl.where(cols == 3, s, 0.0), axis=0)
    clo = tl.sum(tl.where(cols == 4, s, 0.0), axis=0)
    chi = tl.sum(tl.where(cols == 5, s, 0.0), axis=0)
    rsum = tl.sum(tl.where(cols == 6, s, 0.0), axis=0)
    rmin = tl.min(tl.where(cols == 7, mn, float("inf")), axis=0)
    rmax = tl.max(tl.where(cols == 8, mx, -float("inf")), axis=0)
    akl = tl.sum(tl.where(cols == 9, s, 0.0), axis=0)
    ksum = tl.sum(tl.where(cols == 10, s, 0.0), axis=0)
    hsum = tl.sum(tl.where(cols == 11, s, 0.0), axis=0)

    # The count of the normaliser: num_items when given, else tokens (token-mean) or rows; at least 1.
    if AGG == _TOKEN_MEAN:
        count = n
    else:
        count = B + 0.0 * n
    count = tl.maximum(tl.where(num_items_value > 0, num_items_value, count), 1.0)
    if NUM_ITEMS_FROM_PTR:
        # A tensor's value, unchecked: csrc/policy_loss/math.h tensor_items' rule (below 1 counts
        # as 1; NaN or +-inf gives NaN: v - v is 0 for finite v, NaN otherwise).
        v = tl.load(num_items_ptr).to(tl.float32)
        count = tl.where(v < 1.0, 1.0, v) + (v - v)
    inv = 1.0 / (count * norm_scale)
    inv_n = 1.0 / tl.maximum(n, 1.0)
    tl.store(loss_ptr, (pol + kl_coef * kl - ent_coef * ent) * inv)
    tl.store(stats_ptr + _S_INV_NORM, inv)
    tl.store(stats_ptr + _S_PG_LOSS, pol * inv)
    tl.store(stats_ptr + _S_CLIPFRAC_LOW, clo * inv_n)
    tl.store(stats_ptr + _S_CLIPFRAC_HIGH, chi * inv_n)
    tl.store(stats_ptr + _S_CLIPFRAC, (clo + chi) * inv_n)
    tl.store(stats_ptr + _S_RATIO_MEAN, rsum * inv_n)
    tl.store(stats_ptr + _S_RATIO_MIN, tl.where(n > 0, rmin, 1.0))
    tl.store(stats_ptr + _S_RATIO_MAX, tl.where(n > 0, rmax, 1.0))
    tl.store(stats_ptr + _S_APPROX_KL, akl * inv_n)
    tl.store(stats_ptr + _S_KL_REF, ksum * inv_n)
    tl.store(stats_ptr + _S_ENTROPY, hsum * inv_n)
    tl.store(stats_ptr + _S_NUM_VALID, n)


def policy_loss_fwd(
    logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, num_items,
    method: int, agg: int, ratio_lo: float, ratio_hi: float, dual_clip: float, tau_pos: float, tau_neg: float,
    kl_coef: float, kl_estimator: int, entropy_coef: float, num_items_value: float, norm_scale: float,
    kl_ratio_weighted: bool, need_grad_entropy: bool,
):
    """(loss [] f32, stats [NUM_STATS] f32, grad_logprobs [B, T] f32, grad_entropy [B, T] f32 | empty).

    The same contract as the C++ op `erpd::policy_loss_fwd` (csrc/bindings.cpp): float32
    contiguous [B, T] inputs (advantages [B] or [B, T], mask bool), gradients without the 1/D
    factor, stats[0] = 1/D.
    """
    B, T = logprobs.shape
    dev = logprobs.device
    f32 = dict(dtype=torch.float32, device=dev)
    grad_lp = torch.empty(B, T, **f32)
    grad_ent = torch.empty(B, T, **f32) if need_grad_entropy else torch.empty(0, **f32)
    part = torch.empty(B, NUM_PARTS, **f32)
    loss = torch.empty((), **f32)
    stats = torch.empty(NUM_STATS, **f32)
    block_t = min(1024, triton.next_power_of_2(max(T, 16)))
    dummy = logprobs
    with on_device(dev):
        if B > 0:
            _policy_loss_fwd_kernel[(B,)](
                logprobs, old_logprobs, advantages, mask.view(torch.uint8),
                dummy if ref_logprobs is None else ref_logprobs,
                dummy if entropy is None else entropy,
                dummy if is_weights is None else is_weights,
                grad_lp, grad_ent if need_grad_entropy else grad_lp, part,
                T, float(ratio_lo), float(ratio_hi), float(dual_clip), float(tau_pos), float(tau_neg),
                float(kl_coef), float(entropy_coef),
                METHOD=int(method), AGG=int(agg), KL_EST=int(kl_estimator),
                HAS_REF=ref_logprobs is not None, HAS_ENT=entropy is not None, HAS_ISW=is_weights is not None,
                HAS_DUAL=dual_clip > 0, KL_RATIO=bool(kl_ratio_weighted) and ref_logprobs is not None,
                NEED_GENT=bool(need_grad_entropy), ADV_PER_ROW=advantages.dim() == 1,
                BLOCK_T=block_t, num_warps=4 if block_t <= 512 else 8,
            )
        _policy_loss_finalize_kernel[(1,)](
            part, loss, stats, dummy if num_items is None else num_items,
            B, float(num_items_value), float(norm_scale), float(kl_coef), float(entropy_coef),
            AGG=int(agg), NUM_ITEMS_FROM_PTR=num_items is not None,
            BLOCK_B=min(1024, triton.next_power_of_2(max(B, 16))), num_warps=4,
        )
    return loss, stats, grad_lp, grad_ent
