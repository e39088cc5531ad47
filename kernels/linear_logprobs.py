r"""Fused linear + log-softmax gather (+ entropy) in Triton: per-token log-probs from hidden states.

Math. For row i with hidden state h_i, LM head W [V, H], bias b, inverse temperature t and
target y_i, the logits are z_ik = (h_i . W_k + b_k) * t. Vocabulary blocks are visited one at a
time, keeping per row the running statistics

    m = max_k z_k,    s = sum_k e^{z_k - m},    u = sum_k e^{z_k - m} (z_k - m),

which merge across blocks (or across vocabulary splits) as, for a new maximum m' >= m,

    s' = e^{m - m'} s,    u' = e^{m - m'} (u + s (m - m')).

At the end lse = m + log s, log p_y = z_y - lse and H = -sum_k p_k log p_k = log s - u / s.
(Keeping u = sum e^{z-m} z instead and writing H = lse - u/s gives the same number, but
accumulating z - m instead of z avoids subtracting two values of size |lse| when the logits are
large, which would cost fp32 digits in H.)

Backward, with upstream g_lp (log-prob) and g_H (entropy), p_k = e^{z_k - lse}:

    dz_k = g_lp (delta_{k y} - p_k) - g_H p_k (log p_k + H)
    dh   = t * dz @ W,      dW = t * dz^T @ h,      db = t * sum_rows dz.

Softcapping (SOFTCAP, cap_scale a > 0): h . W_k + b_k above becomes tanh(a (h . W_k + b_k)) and
t carries softcap / temperature (erpd/ops/_validate.py logit_transform); dz picks up the factor
a (1 - tanh^2). Statistics (STATS, erpd.linear_token_stats): also s2 = sum_k e^{2 (z_k - m)}
(log sum p^2 = log s2 - 2 log s), the sum of the logits (their mean) and the maximum over the
columns before the target (the target is top-1 when z_y >= m and z_y > that maximum: argmax's
first-index rule), merged across tiles and splits like (m, s, u).

Layout. The forward grid is (row blocks, vocabulary splits). Each program walks its slice of the
vocabulary in BLOCK_N-wide tiles, computing each [BLOCK_M, BLOCK_N] logit tile with a K-loop of
`tl.dot` in registers, and folds it into (m, s, u) and the target logit. With one split it writes
logp / entropy / lse directly; with several it writes per-split partials that a small combine
kernel merges. Splitting the vocabulary keeps the GPU busy when there are few row blocks.

The backward grid covers every (row block, vocabulary block) pair. Each program recomputes its
logit tile, forms dz in registers, and adds dz @ W_tile into an fp32 dh[N, H] workspace and
dz^T @ h_tile into an fp32 dW[V, H] workspace with atomics, one BLOCK_K slice of H at a time.
Neither pass ever writes an [N, V] tensor.

Precision. All accumulation is fp32. On GPU, bf16/fp16 operands go to the tensor cores as they
are (dz is rounded to the input dtype for the two gradient GEMMs, as in the unfused PyTorch
backward); fp32 operands use 3xTF32, which is close to IEEE fp32 at a fraction of its cost.
Under the Triton interpreter every operand is upcast to fp32 first (its bf16 dot is wrong).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from erpd.kernels._launch import (
    COMBINE_BLOCK,
    GradWorkspaces,
    bwd_grid,
    dot_precision,
    fwd_grid,
    interpreting,
    launch_options,
    on_device,
)

__all__ = ["linear_logprobs_fwd", "linear_logprobs_bwd"]

# The sm_90 compile tests build the kernels with the launchers' dot precision, read from here.
_dot_precision = dot_precision


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr, rows, row_mask, cols, col_mask, H, inv_t,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """z[BLOCK_M, BLOCK_N] = (h[rows] @ W[cols]^T + b[cols]) * inv_t in fp32 (columns past V are
    garbage; callers mask them)."""
    # int64: row * H and col * H overflow int32 at realistic sizes (152k vocab x 16k hidden).
    h_base = h_ptr + rows.to(tl.int64)[:, None] * H
    w_base = w_ptr + cols.to(tl.int64)[:, None] * H
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            a = tl.load(h_base + ks[None, :], mask=row_mask[:, None], other=0.0)
            w = tl.load(w_base + ks[None, :], mask=col_mask[:, None], other=0.0)
        else:
            k_mask = ks < H
            a = tl.load(h_base + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_base + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc * inv_t


@triton.jit
def _p_times(p, x):
    """p * x, but 0 where p == 0: a zero-probability token (a -inf logit, or a padding column) adds
    nothing to an expectation even where x is ±inf or NaN there. A NaN p stays NaN."""
    return tl.where(p == 0.0, 0.0, p * x)


@triton.jit
def _no_inf_shift(m):
    """A row's shift for z - m: m, or 0 where the row has seen only -inf logits (-inf - -inf would be
    NaN; with 0 their exponentials are 0, as they should be)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _merge_stats(m, s, u, m_blk, s_blk, u_blk):
    """Merge two partial (max, sum-exp, shifted sum) triples of the same rows.

    A side that has seen nothing has s == 0 and m == -inf; its shift term is forced to 0 so that
    0 * inf never appears.
    """
    m_new = tl.maximum(m, m_blk)
    m_safe = _no_inf_shift(m_new)
    a = tl.exp(m - m_safe)
    a_blk = tl.exp(m_blk - m_safe)
    d = tl.where(s > 0, m - m_safe, 0.0)
    d_blk = tl.where(s_blk > 0, m_blk - m_safe, 0.0)
    s_new = a * s + a_blk * s_blk
    u_new = a * (u + s * d) + a_blk * (u_blk + s_blk * d_blk)
    return m_new, s_new, u_new


@triton.jit
def _tanh(x):
    """tanh to a few ulp from exp alone (the interpreter has no libdevice): (1 - e)/(1 + e) with
    e = exp(-2|x|), whose subtraction would cancel near 0, where the odd Taylor series to x^9
    takes over (its truncation error at |x| = 0.25 is ~1e-8 relative)."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    t = (1.0 - e) / (1.0 + e)
    x2 = x * x
    series = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    t = tl.where(ax < 0.25, series, t)
    return tl.where(x < 0, -t, t)


@triton.jit
def _merge_sq(m, s2, m_blk, s2_blk):
    """Merges two partial sums of e^{2 (z - m)} around their maxima (as _merge_stats does s)."""
    m_safe = _no_inf_shift(tl.maximum(m, m_blk))
    return tl.exp(2.0 * (m - m_safe)) * s2 + tl.exp(2.0 * (m_blk - m_safe)) * s2_blk


@triton.jit
def _store_stats(stats_ptr, rows, row_mask, N, V, m, s, z_tgt, s2, z_sum, m_before, valid):
    """stats[3, N]: log sum p^2, the mean logit, is_top1 (0/1); 0 on ignored rows."""
    # s2 >= 1 on any row with a finite logit; 0 only on padding rows past N and dead rows.
    dead = s == 0
    log_sq = tl.log(tl.where(dead, 1.0, s2)) - 2.0 * tl.log(tl.where(dead, 1.0, s))
    top1 = (z_tgt >= m) & (z_tgt > m_before)
    tl.store(stats_ptr + rows, tl.where(valid, log_sq, 0.0), mask=row_mask)
    tl.store(stats_ptr + N + rows, tl.where(valid, z_sum / V, 0.0), mask=row_mask)
    tl.store(stats_ptr + 2 * N + rows, tl.where(valid & top1, 1.0, 0.0), mask=row_mask)


@triton.jit
def _finalize(m, s, u, z_tgt, valid):
    """(log p_y, entropy, lse) from merged statistics; ignored rows give 0, 0 and their lse."""
    # s == 0 on padding rows past N (never stored) and on rows whose logits are all -inf, which
    # have no distribution: keep log(0) and 0/0 out, and give those rows NaN as the other backends do.
    dead = s == 0  # == 0, not > 0: a NaN sum must stay NaN
    s = tl.where(dead, 1.0, s)
    log_s = tl.log(s)
    lse = m + log_s
    logp = tl.where(valid, z_tgt - lse, 0.0)
    entropy = tl.where(valid, tl.where(dead, float("nan"), log_s - u / s), 0.0)
    return logp, entropy, lse


@triton.jit
def _linear_logprobs_fwd_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr,
    logp_ptr, ent_ptr, lse_ptr, stats_ptr,  # [N] outputs and [3, N] stats, written when FINALIZE
    part_ptr,  # [4 (7 with STATS), n_split, N] partials (m, s, u, z_target[, s2, z_sum, m_before]) otherwise
    N, H, V, tile_scale, inv_t, cap_scale, ignore_index, v_per_split, plane,  # plane = n_split * N
    HAS_BIAS: tl.constexpr, FINALIZE: tl.constexpr, SOFTCAP: tl.constexpr, STATS: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    tgt = tl.load(t_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (tgt != ignore_index)
    # Column ids are < V < 2^31: compare in int32 (ignored rows may alias a column; `valid`
    # discards them).
    tgt32 = tgt.to(tl.int32)

    v_lo = split * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    u = tl.zeros((BLOCK_M,), dtype=tl.float32)
    z_tgt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    z_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_before = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        col_mask = cols < v_hi
        # tile_scale is inv_t, or cap_scale with SOFTCAP (the temperature comes after the tanh).
        z = _logits_tile(
            h_ptr, w_ptr, b_ptr, rows, row_mask, cols, col_mask, H, tile_scale,
            HAS_BIAS, UPCAST, DOT_PRECISION, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K,
        )
        if SOFTCAP:
            z = _tanh(z) * inv_t
        z = tl.where(col_mask[None, :], z, float("-inf"))
        # m_blk is -inf only where the tile's real columns all have -inf logits (masked tokens).
        m_blk = tl.max(z, axis=1)
        zc = z - _no_inf_shift(m_blk)[:, None]
        e = tl.exp(zc)
        s_blk = tl.sum(e, axis=1)
        # Padding columns and -inf logits have e == 0 but zc == -inf: keep 0 * inf out of the sum.
        u_blk = tl.sum(_p_times(e, zc), axis=1)
        if STATS:
            s2 = _merge_sq(m, s2, m_blk, tl.sum(e * e, axis=1))
            z_sum += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)
            before = cols[None, :] < tgt32[:, None]
            m_before = tl.maximum(m_before, tl.max(tl.where(before, z, float("-inf")), axis=1))
        m, s, u = _merge_stats(m, s, u, m_blk, s_blk, u_blk)
        z_tgt += tl.sum(tl.where(cols[None, :] == tgt32[:, None], z, 0.0), axis=1)

    if FINALIZE:
        logp, entropy, lse = _finalize(m, s, u, z_tgt, valid)
        tl.store(logp_ptr + rows, logp, mask=row_mask)
        tl.store(ent_ptr + rows, entropy, mask=row_mask)
        tl.store(lse_ptr + rows, lse, mask=row_mask)
        if STATS:
            _store_stats(stats_ptr, rows, row_mask, N, V, m, s, z_tgt, s2, z_sum, m_before, valid)
    else:
        off = split.to(tl.int64) * N + rows
        tl.store(part_ptr + off, m, mask=row_mask)
        tl.store(part_ptr + plane + off, s, mask=row_mask)
        tl.store(part_ptr + 2 * plane + off, u, mask=row_mask)
        tl.store(part_ptr + 3 * plane + off, z_tgt, mask=row_mask)
        if STATS:
            tl.store(part_ptr + 4 * plane + off, s2, mask=row_mask)
            tl.store(part_ptr + 5 * plane + off, z_sum, mask=row_mask)
            tl.store(part_ptr + 6 * plane + off, m_before, mask=row_mask)


@triton.jit
def _linear_logprobs_combine_kernel(
    part_ptr, t_ptr, logp_ptr, ent_ptr, lse_ptr, stats_ptr,
    N, V, ignore_index, n_split, plane,  # plane = n_split * N
    STATS: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < N
    tgt = tl.load(t_ptr + rows, mask=row_mask, other=ignore_index)
    m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    u = tl.zeros((BLOCK,), dtype=tl.float32)
    z_tgt = tl.zeros((BLOCK,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK,), dtype=tl.float32)
    z_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    m_before = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    off = rows.to(tl.int64)
    for _ in range(0, n_split):
        m_i = tl.load(part_ptr + off, mask=row_mask, other=float("-inf"))
        s_i = tl.load(part_ptr + plane + off, mask=row_mask, other=0.0)
        u_i = tl.load(part_ptr + 2 * plane + off, mask=row_mask, other=0.0)
        if STATS:
            s2 = _merge_sq(m, s2, m_i, tl.load(part_ptr + 4 * plane + off, mask=row_mask, other=0.0))
            z_sum += tl.load(part_ptr + 5 * plane + off, mask=row_mask, other=0.0)
            m_before = tl.maximum(m_before, tl.load(part_ptr + 6 * plane + off, mask=row_mask, other=float("-inf")))
        m, s, u = _merge_stats(m, s, u, m_i, s_i, u_i)
        # Only the split holding the target column saw it; the others contributed 0.
        z_tgt += tl.load(part_ptr + 3 * plane + off, mask=row_mask, other=0.0)
        off += N
    valid = row_mask & (tgt != ignore_index)
    logp, entropy, lse = _finalize(m, s, u, z_tgt, valid)
    tl.store(logp_ptr + rows, logp, mask=row_mask)
    tl.store(ent_ptr + rows, entropy, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    if STATS:
        _store_stats(stats_ptr, rows, row_mask, N, V, m, s, z_tgt, s2, z_sum, m_before, valid)


@triton.jit
def _add_tile_grads(
    dz, rows, cols, valid, col_mask, h_ptr, w_ptr, dh_ptr, dw_ptr, db_ptr, H,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, UPCAST: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Adds one [BLOCK_M, BLOCK_N] tile's share of the gradients, given its logits gradient dz
    (fp32, temperature folded in, zero outside valid rows and columns): db += sum_rows dz,
    dh[rows] += dz @ W[cols], dW[cols] += dz^T @ h[rows], into fp32 buffers with atomics (several
    vocabulary blocks add to the same dh rows, several row blocks to the same dW rows). Shared by
    every recompute-style backward kernel (linear_logprobs, linear_kl)."""
    if NEED_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(dz, axis=0), mask=col_mask, sem="relaxed")
    if NEED_DH or NEED_DW:
        # 16-bit operands: dz is rounded to their dtype for the tensor cores, as the unfused
        # PyTorch backward does; accumulation stays fp32.
        if UPCAST:
            dz_op = dz
        else:
            dz_op = dz.to(h_ptr.dtype.element_ty)
        h_base = h_ptr + rows.to(tl.int64)[:, None] * H
        w_base = w_ptr + cols.to(tl.int64)[:, None] * H
        dh_base = dh_ptr + rows.to(tl.int64)[:, None] * H
        dw_base = dw_ptr + cols.to(tl.int64)[:, None] * H
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            if EVEN_K:
                k_mask = tl.full((BLOCK_K,), 1, tl.int1)
            else:
                k_mask = ks < H
            if NEED_DH:
                w = tl.load(w_base + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
                if UPCAST:
                    w = w.to(tl.float32)
                dh = tl.dot(dz_op, w, input_precision=DOT_PRECISION)
                tl.atomic_add(dh_base + ks[None, :], dh, mask=valid[:, None] & k_mask[None, :], sem="relaxed")
            if NEED_DW:
                x = tl.load(h_base + ks[None, :], mask=valid[:, None] & k_mask[None, :], other=0.0)
                if UPCAST:
                    x = x.to(tl.float32)
                dw = tl.dot(tl.trans(dz_op), x, input_precision=DOT_PRECISION)
                tl.atomic_add(dw_base + ks[None, :], dw, mask=col_mask[:, None] & k_mask[None, :], sem="relaxed")


@triton.jit
def _linear_logprobs_bwd_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr,
    dh_ptr, dw_ptr, db_ptr,  # fp32 workspaces, accumulated with atomics
    N, H, V, tile_scale, inv_t, cap_scale, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, SOFTCAP: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Launch order: GROUP_M consecutive row blocks sweep the vocabulary together, so a W tile
    # is fetched from HBM once per group and the group's hidden rows stay resident in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(N, BLOCK_M)
    num_pid_n = tl.cdiv(V, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    col_mask = cols < V
    tgt = tl.load(t_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (tgt != ignore_index)
    tgt32 = tgt.to(tl.int32)

    # A block of only ignored (or padding) rows has dz == 0: skip the recompute and the atomics.
    if tl.max(valid.to(tl.int32), axis=0) > 0:
        z = _logits_tile(
            h_ptr, w_ptr, b_ptr, rows, valid, cols, col_mask, H, tile_scale,
            HAS_BIAS, UPCAST, DOT_PRECISION, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K,
        )
        if SOFTCAP:
            th = _tanh(z)
            z = th * inv_t
        lse = tl.load(lse_ptr + rows, mask=valid, other=0.0)
        g_lp = tl.load(glp_ptr + rows, mask=valid, other=0.0)
        logp = z - lse[:, None]
        p = tl.exp(logp)
        dz = g_lp[:, None] * (tl.where(cols[None, :] == tgt32[:, None], 1.0, 0.0) - p)
        if HAS_GRAD_ENTROPY:
            ent = tl.load(ent_ptr + rows, mask=valid, other=0.0)
            g_h = tl.load(gent_ptr + rows, mask=valid, other=0.0)
            dz -= g_h[:, None] * _p_times(p, logp + ent[:, None])
        # The temperature's chain-rule factor is folded into dz once, before the GEMMs.
        dz = tl.where(valid[:, None] & col_mask[None, :], dz, 0.0) * inv_t
        if SOFTCAP:
            dz = dz * (cap_scale * (1.0 - th * th))

        _add_tile_grads(
            dz, rows, cols, valid, col_mask, h_ptr, w_ptr, dh_ptr, dw_ptr, db_ptr, H,
            NEED_DH, NEED_DW, NEED_DB, UPCAST, EVEN_K, BLOCK_K, DOT_PRECISION,
        )


# ----------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------

# GPU defaults, Hopper-sized (tuning is a separate job). The compile-only CI test builds these
# same configs for sm_90 and checks they fit in shared memory. 16-bit operands take the usual
# 128x128x64 wgmma tiles. fp32 operands are twice as wide and 3xTF32 keeps extra split copies of
# each tile, so they take K=32 slices, and in the backward smaller tiles (128x128 fp32 there
# spills registers and needs more shared memory than an H100 has).
_GPU_FWD = {
    "16bit": dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    "fp32": dict(BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
}
_GPU_BWD = {
    "16bit": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    "fp32": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
}

# Interpreter: each program costs a fixed Python overhead plus numpy work on whole tiles, so
# fairly wide tiles keep the small test shapes at well under a second. BLOCK_M=32 still gives
# several row blocks (and a partial launch group) on them. One config only: the interpreter
# cannot autotune over several.
_INTERP_FWD = dict(BLOCK_M=32, BLOCK_N=256, BLOCK_K=64, num_warps=4, num_stages=1)
_INTERP_BWD = dict(BLOCK_M=32, BLOCK_N=256, BLOCK_K=64, GROUP_M=2, num_warps=4, num_stages=1)


def fwd_config(n: int, dtype: torch.dtype, interpreting: bool) -> dict:
    """Tile sizes and launch options of the forward kernel."""
    if interpreting:
        return dict(_INTERP_FWD)
    cfg = dict(_GPU_FWD["fp32" if dtype == torch.float32 else "16bit"])
    # Small batches: half-height tiles waste less of each wgmma on padding rows.
    cfg["BLOCK_M"] = 128 if n >= 1024 else 64
    return cfg


def bwd_config(dtype: torch.dtype, interpreting: bool) -> dict:
    """Tile sizes and launch options of the backward kernel."""
    if interpreting:
        return dict(_INTERP_BWD)
    return dict(_GPU_BWD["fp32" if dtype == torch.float32 else "16bit"])


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def linear_logprobs_fwd(hidden, weight, bias, targets, inv_temperature: float, softcap_scale: float,
                        ignore_index: int, with_stats: bool):
    """(logprobs[N], entropy[N], lse[N], stats[3, N] or empty), all float32; see the module
    docstring for the math."""
    n, h = hidden.shape
    v = weight.shape[0]
    interp = interpreting()
    dev = hidden.device
    logp = torch.empty(n, dtype=torch.float32, device=dev)
    ent = torch.empty(n, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    stats = torch.empty((3, n) if with_stats else (0,), dtype=torch.float32, device=dev)
    softcap = softcap_scale > 0.0

    g = fwd_grid(n, v, fwd_config(n, hidden.dtype, interp), dev, interp)
    part = logp if g.finalize else torch.empty(7 if with_stats else 4, g.split, n, dtype=torch.float32, device=dev)

    with on_device(dev):
        _linear_logprobs_fwd_kernel[g.grid](
            hidden, weight, hidden if bias is None else bias, targets,
            logp, ent, lse, stats if with_stats else logp, part,
            n, h, v, float(softcap_scale if softcap else inv_temperature), float(inv_temperature),
            float(softcap_scale), int(ignore_index), g.v_per_split, g.split * n,
            HAS_BIAS=bias is not None, FINALIZE=g.finalize, SOFTCAP=softcap, STATS=bool(with_stats),
            **launch_options(g.cfg, h, interp),
        )
        if not g.finalize:
            _linear_logprobs_combine_kernel[(triton.cdiv(n, COMBINE_BLOCK),)](
                part, targets, logp, ent, lse, stats if with_stats else logp,
                n, v, int(ignore_index), g.split, g.split * n,
                STATS=bool(with_stats), BLOCK=COMBINE_BLOCK, num_warps=4,
            )
    return logp, ent, lse, stats


def linear_logprobs_bwd(
    hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy,
    inv_temperature: float, softcap_scale: float, ignore_index: int, need_grad_hidden: bool, need_grad_weight: bool,
):
    """(grad_hidden, grad_weight, grad_bias); each is torch.empty(0) when not requested.

    grad_hidden / grad_weight come back in the input dtype, grad_bias in float32.
    """
    n, h = hidden.shape
    v = weight.shape[0]
    interp = interpreting()
    ws = GradWorkspaces(hidden, weight, bias, need_grad_hidden, need_grad_weight)

    if ws.needed:
        cfg = bwd_config(hidden.dtype, interp)
        with on_device(hidden.device):
            _linear_logprobs_bwd_kernel[bwd_grid(n, v, cfg)](
                hidden, weight, hidden if bias is None else bias, targets, lse, entropy,
                grad_logprobs, grad_logprobs if grad_entropy is None else grad_entropy,
                *ws.pointers(lse),
                n, h, v, float(softcap_scale if softcap_scale > 0.0 else inv_temperature), float(inv_temperature),
                float(softcap_scale), int(ignore_index),
                HAS_BIAS=ws.need_b, HAS_GRAD_ENTROPY=grad_entropy is not None, SOFTCAP=softcap_scale > 0.0,
                **ws.flags(), **launch_options(cfg, h, interp),
            )
    return ws.grads(hidden, weight)
