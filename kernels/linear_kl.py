r"""Fused linear + KL divergence to a teacher in Triton: per-token forward KL, reverse KL or
generalized JSD between the student's and the teacher's next-token distributions, straight from
hidden states.

Math. For row i the student logits are zS_k = (h_i . W_k + b_k) t and the teacher logits are
either fused, zT_k = (hT_i . WT_k + bT_k) t (the hidden sizes may differ), or dense, zT_k =
teacher_logits_ik t, with t the inverse temperature. p^S = softmax(zS), p^T = softmax(zT),
lse_S / lse_T their log-sum-exps, log p = z - lse. Rows whose target is ignore_index give 0.

* forward (mode 0): KL(T||S) = sum_k p^T_k (zT_k - zS_k) - lse_T + lse_S,
                    dKL/dzS_k = p^S_k - p^T_k.
* reverse (mode 1): KL(S||T) = sum_k p^S_k (zS_k - zT_k) - lse_S + lse_T,
                    dKL/dzS_k = p^S_k (log p^S_k - log p^T_k - KL).
* jsd (mode 2), 0 < beta < 1, mixture log m_k = logaddexp(log(1-beta) + log p^S_k,
  log beta + log p^T_k):
      JSD = beta sum p^T (log p^T - log m) + (1-beta) sum p^S (log p^S - log m),
      dJSD/dzS_k = (1-beta) p^S_k (log p^S_k - log m_k - KL(S||M)),
  with KL(S||M) = sum p^S (log p^S - log m), returned as `aux` for the backward (for the two
  KLs `aux` is the KL itself).

Backward: dz_k = g_i t dKL/dzS_k for upstream g_i, then dh = dz W, dW = dz^T h, db = sum_rows dz.
The teacher gets no gradient.

Forward, one pass (modes 0 and 1). Call w the side whose probabilities weight the sum (T for the
forward KL, S for the reverse) and o the other side. Over vocabulary blocks each row keeps both
softmax statistics (m_w, s_w = sum e^{z_w - m_w}) and (m_o, s_o), and

    a = sum_k e^{z_w,k - m_w} ((z_w,k - m_w) - (z_o,k - m_o)).

When the references move to m_w' >= m_w, m_o' >= m_o (a new block or another vocabulary split):

    s_w' = e^{m_w - m_w'} s_w,    a' = e^{m_w - m_w'} (a + s_w ((m_w - m_w') - (m_o - m_o'))),

and at the end KL = a / s_w - log s_w + log s_o. Keeping z - m in a instead of the raw logits
(the same choice as the entropy of linear_logprobs) means a teacher whose logits are the
student's plus a large offset gives KL ~ 0 without subtracting two numbers of size |z|.

Forward, jsd: log m needs both normalized log-probs, so a first pass gets lse_S and lse_T (the
same kernel with the sum a switched off) and a second pass over the vocabulary recomputes both
logit tiles and sums the two KL(.||M) terms, which are plain additive sums once the lse are known.
It forms log p = (z - m) - log s from the first pass's m and log s rather than z - lse: an lse
rounded to fp32 would shift every log p of a row by up to half an ulp of |lse|.

Layout follows kernels/linear_logprobs.py. Forward grid: (row blocks, vocabulary splits); each
program computes [BLOCK_M, BLOCK_N] student and teacher logit tiles with K-loops of `tl.dot` in
registers (the dense teacher form loads its tile instead of the second GEMM) and folds them into
the running statistics; with several splits a combine kernel merges per-split partials. Backward
grid: every (row block, vocabulary block) pair recomputes both tiles, forms dz in registers and
adds dz @ W into an fp32 dh and dz^T @ h into an fp32 dW with atomics. No [N, V] tensor is ever
written (the dense teacher's logits are only read).

Precision: all accumulation in fp32; on GPU 16-bit operands feed the tensor cores as they are,
fp32 operands use 3xTF32; the interpreter upcasts everything to fp32 (as linear_logprobs does).
The backward gets lse_S / lse_T as fp32 numbers, so its log p = z - lse carries up to half an
ulp of |lse| (4e-6 at |lse| = 64) as a per-row offset; linear_logprobs has the same bound.
"""

from __future__ import annotations

import math

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
from erpd.kernels.linear_logprobs import _add_tile_grads, _logits_tile, _no_inf_shift, _p_times

__all__ = ["linear_kl_fwd", "linear_kl_bwd", "fwd_config", "bwd_config", "MODES"]

# The sm_90 compile tests build the kernels with the launchers' dot precision, read from here.
_dot_precision = dot_precision

# mode codes of the op's contract
FORWARD, REVERSE, JSD = 0, 1, 2
MODES = {"forward": FORWARD, "reverse": REVERSE, "jsd": JSD}


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _teacher_tile(
    th_ptr, tw_ptr, tb_ptr, tl_ptr, rows, row_mask, cols, col_mask, HT, V, inv_t,
    HAS_TBIAS: tl.constexpr, DENSE_TEACHER: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_KT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Teacher logits zT[BLOCK_M, BLOCK_N] in fp32: read from the dense [N, V] logits or computed
    by the teacher's own GEMM (columns past V are garbage; callers mask them)."""
    if DENSE_TEACHER:
        # int64: row * V overflows int32 at 16k tokens x 152k vocabulary.
        ptrs = tl_ptr + rows.to(tl.int64)[:, None] * V + cols[None, :]
        zt = tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32) * inv_t
    else:
        zt = _logits_tile(
            th_ptr, tw_ptr, tb_ptr, rows, row_mask, cols, col_mask, HT, inv_t,
            HAS_TBIAS, UPCAST, DOT_PRECISION, EVEN_KT, BLOCK_M, BLOCK_N, BLOCK_K,
        )
    return zt


@triton.jit
def _merge_kl_stats(m_w, s_w, m_o, s_o, a, m_w2, s_w2, m_o2, s_o2, a2):
    """Merge two partial (m_w, s_w, m_o, s_o, a) statistics of the same rows (module docstring).

    A side that has seen nothing has s == 0 and m == -inf; its reference-shift term is forced to
    0 so that 0 * inf never appears.
    """
    mw_new = tl.maximum(m_w, m_w2)
    mo_new = tl.maximum(m_o, m_o2)
    mw_safe = _no_inf_shift(mw_new)
    mo_safe = _no_inf_shift(mo_new)
    c_w = tl.exp(m_w - mw_safe)
    c_w2 = tl.exp(m_w2 - mw_safe)
    # A side with s == 0 (no columns yet, or only -inf logits) contributes no shift. Where s_w == 0
    # the shift is multiplied by s_w; where only s_o == 0, a is already +inf (p^w > 0 against a
    # zero-probability o token) and stays so.
    r = tl.where(s_w > 0, m_w - mw_safe, 0.0) - tl.where(s_o > 0, m_o - mo_safe, 0.0)
    r2 = tl.where(s_w2 > 0, m_w2 - mw_safe, 0.0) - tl.where(s_o2 > 0, m_o2 - mo_safe, 0.0)
    s_w_new = c_w * s_w + c_w2 * s_w2
    s_o_new = tl.exp(m_o - mo_safe) * s_o + tl.exp(m_o2 - mo_safe) * s_o2
    a_new = c_w * (a + s_w * r) + c_w2 * (a2 + s_w2 * r2)
    return mw_new, s_w_new, mo_new, s_o_new, a_new


@triton.jit
def _nonneg(kl):
    """A divergence is >= 0; rounding leaves ~-1e-8 where the distributions coincide. NaN stays
    NaN (the comparison is false), as in the C++ and CUDA backends."""
    return tl.where(kl < 0.0, 0.0, kl)


@triton.jit
def _store_pass1(
    kl_ptr, aux_ptr, lse_s_ptr, lse_t_ptr, stats_ptr, rows, row_mask, valid, N,
    m_w, s_w, m_o, s_o, a, MODE: tl.constexpr,
):
    """Final outputs of the first forward pass from merged statistics: lse_S and lse_T, and kl
    (= aux) in modes 0/1 (0 on ignored rows); in mode 2 also (m, log s) of both sides for the
    second pass."""
    # s == 0 on padding rows past N (never stored) and where a side's logits are all -inf (no
    # distribution: NaN, as the other backends give): keep log(0) and 0/0 out of them.
    dead_w = s_w == 0  # == 0, not > 0: a NaN sum must stay NaN
    dead_o = s_o == 0
    s_w = tl.where(dead_w, 1.0, s_w)
    s_o = tl.where(dead_o, 1.0, s_o)
    log_sw = tl.log(s_w)
    log_so = tl.log(s_o)
    if MODE == 1:
        tl.store(lse_s_ptr + rows, m_w + log_sw, mask=row_mask)
        tl.store(lse_t_ptr + rows, m_o + log_so, mask=row_mask)
    else:
        tl.store(lse_s_ptr + rows, m_o + log_so, mask=row_mask)
        tl.store(lse_t_ptr + rows, m_w + log_sw, mask=row_mask)
    if MODE == 2:
        # The second pass forms log p = (z - m) - log s: subtracting an fp32-rounded lse = m + log s
        # instead would shift every log p of the row by up to half an ulp of |lse|.
        off = rows.to(tl.int64)
        tl.store(stats_ptr + off, m_o, mask=row_mask)
        tl.store(stats_ptr + N + off, log_so, mask=row_mask)
        tl.store(stats_ptr + 2 * N + off, m_w, mask=row_mask)
        tl.store(stats_ptr + 3 * N + off, log_sw, mask=row_mask)
    else:
        kl = tl.where(valid, tl.where(dead_w | dead_o, float("nan"), a / s_w - log_sw + log_so), 0.0)
        tl.store(kl_ptr + rows, _nonneg(kl), mask=row_mask)
        tl.store(aux_ptr + rows, kl, mask=row_mask)


@triton.jit
def _log_mixture(lp_s, lp_t, log_1mb, log_b):
    """log((1 - beta) p^S + beta p^T) from the two log-probs (a stable logaddexp)."""
    x = lp_s + log_1mb
    y = lp_t + log_b
    hi = tl.maximum(x, y)
    # log(1 + e^-d) with e^-d <= 1: its absolute error is ~1 ulp of 1, all that matters here.
    return hi + tl.log(1.0 + tl.exp(-tl.abs(x - y)))


@triton.jit
def _linear_kl_fwd_kernel(
    h_ptr, w_ptr, b_ptr, th_ptr, tw_ptr, tb_ptr, tl_ptr, t_ptr,
    kl_ptr, aux_ptr, lse_s_ptr, lse_t_ptr,  # [N] outputs
    stats_ptr,  # mode 2: [4, N] (m_S, log s_S, m_T, log s_T), written by PASS 1, read by PASS 2
    part_ptr,  # [5, n_split, N] partials, written unless FINALIZE
    N, H, HT, V, inv_t, ignore_index, beta, log_b, log_1mb, v_per_split, plane,  # plane = n_split * N
    MODE: tl.constexpr, PASS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_TBIAS: tl.constexpr, DENSE_TEACHER: tl.constexpr, FINALIZE: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr, EVEN_KT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """PASS 1: softmax statistics of both sides (+ the KL sum `a` in modes 0/1).
    PASS 2 (mode 2 only): the two KL(.||M) sums of the JSD, given lse_S and lse_T."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    tgt = tl.load(t_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (tgt != ignore_index)

    v_lo = split * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    if PASS == 1:
        m_w = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        s_w = tl.zeros((BLOCK_M,), dtype=tl.float32)
        m_o = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        s_o = tl.zeros((BLOCK_M,), dtype=tl.float32)
        a = tl.zeros((BLOCK_M,), dtype=tl.float32)
    else:
        r64 = rows.to(tl.int64)
        m_s = tl.load(stats_ptr + r64, mask=row_mask, other=0.0)
        log_ss = tl.load(stats_ptr + N + r64, mask=row_mask, other=0.0)
        m_t = tl.load(stats_ptr + 2 * N + r64, mask=row_mask, other=0.0)
        log_st = tl.load(stats_ptr + 3 * N + r64, mask=row_mask, other=0.0)
        k_s = tl.zeros((BLOCK_M,), dtype=tl.float32)
        k_t = tl.zeros((BLOCK_M,), dtype=tl.float32)

    for v0 in range(v_lo, v_hi, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        col_mask = cols < v_hi
        zs = _logits_tile(
            h_ptr, w_ptr, b_ptr, rows, row_mask, cols, col_mask, H, inv_t,
            HAS_BIAS, UPCAST, DOT_PRECISION, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K,
        )
        zt = _teacher_tile(
            th_ptr, tw_ptr, tb_ptr, tl_ptr, rows, row_mask, cols, col_mask, HT, V, inv_t,
            HAS_TBIAS, DENSE_TEACHER, UPCAST, DOT_PRECISION, EVEN_KT, BLOCK_M, BLOCK_N, BLOCK_K,
        )
        if PASS == 1:
            if MODE == 1:
                zw = zs
                zo = zt
            else:
                zw = zt
                zo = zs
            # Padding columns: -inf for the max and the exponentials (a block maximum is -inf only
            # where the tile's real logits all are: masked tokens) ...
            mw_blk = tl.max(tl.where(col_mask[None, :], zw, float("-inf")), axis=1)
            mo_blk = tl.max(tl.where(col_mask[None, :], zo, float("-inf")), axis=1)
            zw_c = zw - _no_inf_shift(mw_blk)[:, None]
            zo_c = zo - _no_inf_shift(mo_blk)[:, None]
            e_w = tl.where(col_mask[None, :], tl.exp(zw_c), 0.0)
            sw_blk = tl.sum(e_w, axis=1)
            so_blk = tl.sum(tl.where(col_mask[None, :], tl.exp(zo_c), 0.0), axis=1)
            if MODE == 2:
                a_blk = tl.zeros((BLOCK_M,), dtype=tl.float32)
            else:
                # ... and their (finite, garbage) logits, like -inf ones, stay out of `a` through e_w == 0.
                a_blk = tl.sum(_p_times(e_w, zw_c - zo_c), axis=1)
            m_w, s_w, m_o, s_o, a = _merge_kl_stats(m_w, s_w, m_o, s_o, a, mw_blk, sw_blk, mo_blk, so_blk, a_blk)
        else:
            lp_s = (zs - m_s[:, None]) - log_ss[:, None]
            lp_t = (zt - m_t[:, None]) - log_st[:, None]
            log_m = _log_mixture(lp_s, lp_t, log_1mb, log_b)
            k_s += tl.sum(tl.where(col_mask[None, :], _p_times(tl.exp(lp_s), lp_s - log_m), 0.0), axis=1)
            k_t += tl.sum(tl.where(col_mask[None, :], _p_times(tl.exp(lp_t), lp_t - log_m), 0.0), axis=1)

    off = split.to(tl.int64) * N + rows
    if PASS == 1:
        if FINALIZE:
            _store_pass1(
                kl_ptr, aux_ptr, lse_s_ptr, lse_t_ptr, stats_ptr, rows, row_mask, valid, N,
                m_w, s_w, m_o, s_o, a, MODE,
            )
        else:
            tl.store(part_ptr + off, m_w, mask=row_mask)
            tl.store(part_ptr + plane + off, s_w, mask=row_mask)
            tl.store(part_ptr + 2 * plane + off, m_o, mask=row_mask)
            tl.store(part_ptr + 3 * plane + off, s_o, mask=row_mask)
            tl.store(part_ptr + 4 * plane + off, a, mask=row_mask)
    else:
        if FINALIZE:
            tl.store(kl_ptr + rows, _nonneg(tl.where(valid, beta * k_t + (1.0 - beta) * k_s, 0.0)), mask=row_mask)
            tl.store(aux_ptr + rows, tl.where(valid, k_s, 0.0), mask=row_mask)
        else:
            tl.store(part_ptr + off, k_s, mask=row_mask)
            tl.store(part_ptr + plane + off, k_t, mask=row_mask)


@triton.jit
def _linear_kl_combine_kernel(
    part_ptr, t_ptr, kl_ptr, aux_ptr, lse_s_ptr, lse_t_ptr, stats_ptr,
    N, ignore_index, beta, n_split, plane,  # plane = n_split * N
    MODE: tl.constexpr, PASS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Merge the per-split partials of one forward pass (same PASS numbering as the forward)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < N
    tgt = tl.load(t_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (tgt != ignore_index)
    off = rows.to(tl.int64)
    if PASS == 1:
        m_w = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
        s_w = tl.zeros((BLOCK,), dtype=tl.float32)
        m_o = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
        s_o = tl.zeros((BLOCK,), dtype=tl.float32)
        a = tl.zeros((BLOCK,), dtype=tl.float32)
        for _ in range(0, n_split):
            m_w, s_w, m_o, s_o, a = _merge_kl_stats(
                m_w, s_w, m_o, s_o, a,
                tl.load(part_ptr + off, mask=row_mask, other=float("-inf")),
                tl.load(part_ptr + plane + off, mask=row_mask, other=0.0),
                tl.load(part_ptr + 2 * plane + off, mask=row_mask, other=float("-inf")),
                tl.load(part_ptr + 3 * plane + off, mask=row_mask, other=0.0),
                tl.load(part_ptr + 4 * plane + off, mask=row_mask, other=0.0),
            )
            off += N
        _store_pass1(
            kl_ptr, aux_ptr, lse_s_ptr, lse_t_ptr, stats_ptr, rows, row_mask, valid, N,
            m_w, s_w, m_o, s_o, a, MODE,
        )
    else:
        k_s = tl.zeros((BLOCK,), dtype=tl.float32)
        k_t = tl.zeros((BLOCK,), dtype=tl.float32)
        for _ in range(0, n_split):
            k_s += tl.load(part_ptr + off, mask=row_mask, other=0.0)
            k_t += tl.load(part_ptr + plane + off, mask=row_mask, other=0.0)
            off += N
        tl.store(kl_ptr + rows, _nonneg(tl.where(valid, beta * k_t + (1.0 - beta) * k_s, 0.0)), mask=row_mask)
        tl.store(aux_ptr + rows, tl.where(valid, k_s, 0.0), mask=row_mask)


@triton.jit
def _linear_kl_bwd_kernel(
    h_ptr, w_ptr, b_ptr, th_ptr, tw_ptr, tb_ptr, tl_ptr, t_ptr, lse_s_ptr, lse_t_ptr, aux_ptr, g_ptr,
    dh_ptr, dw_ptr, db_ptr,  # fp32 workspaces, accumulated with atomics
    N, H, HT, V, inv_t, ignore_index, beta, log_b, log_1mb,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TBIAS: tl.constexpr, DENSE_TEACHER: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr, EVEN_KT: tl.constexpr,
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

    # A block of only ignored (or padding) rows has dz == 0: skip the recompute and the atomics.
    if tl.max(valid.to(tl.int32), axis=0) > 0:
        zs = _logits_tile(
            h_ptr, w_ptr, b_ptr, rows, valid, cols, col_mask, H, inv_t,
            HAS_BIAS, UPCAST, DOT_PRECISION, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K,
        )
        zt = _teacher_tile(
            th_ptr, tw_ptr, tb_ptr, tl_ptr, rows, valid, cols, col_mask, HT, V, inv_t,
            HAS_TBIAS, DENSE_TEACHER, UPCAST, DOT_PRECISION, EVEN_KT, BLOCK_M, BLOCK_N, BLOCK_K,
        )
        lp_s = zs - tl.load(lse_s_ptr + rows, mask=valid, other=0.0)[:, None]
        lp_t = zt - tl.load(lse_t_ptr + rows, mask=valid, other=0.0)[:, None]
        p_s = tl.exp(lp_s)
        if MODE == 0:
            dz = p_s - tl.exp(lp_t)
        elif MODE == 1:
            kl = tl.load(aux_ptr + rows, mask=valid, other=0.0)
            dz = _p_times(p_s, lp_s - lp_t - kl[:, None])
        else:
            kl_sm = tl.load(aux_ptr + rows, mask=valid, other=0.0)
            log_m = _log_mixture(lp_s, lp_t, log_1mb, log_b)
            dz = (1.0 - beta) * _p_times(p_s, lp_s - log_m - kl_sm[:, None])
        # The upstream gradient and the temperature's chain-rule factor, folded in once.
        g = tl.load(g_ptr + rows, mask=valid, other=0.0) * inv_t
        dz = tl.where(valid[:, None] & col_mask[None, :], dz * g[:, None], 0.0)

        _add_tile_grads(
            dz, rows, cols, valid, col_mask, h_ptr, w_ptr, dh_ptr, dw_ptr, db_ptr, H,
            NEED_DH, NEED_DW, NEED_DB, UPCAST, EVEN_K, BLOCK_K, DOT_PRECISION,
        )


# ----------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------

# GPU defaults (Hopper-sized, untuned; the sm_90 compile test builds these exact configs and
# checks they fit in shared memory). A program holds two fp32 logit tiles (student and teacher)
# live at once, twice the registers of linear_logprobs' one, so the vocabulary block is half as
# wide. Checked with `ptxas -v` for sm_90a: 16-bit 128x128 tiles spill (up to 4 KB per thread
# with a dense teacher), 128x64 use at most 243 registers and spill nothing; fp32 operands
# (3xTF32 keeps split copies of each tile) spill at 128x64 in the jsd pass and with a dense
# teacher, so they always take 64-row tiles.
_GPU_FWD = {
    "16bit": dict(BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
    "fp32": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
}
_GPU_BWD = {
    "16bit": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    "fp32": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
}

# Interpreter: the same tiles as linear_logprobs' (wide tiles keep the per-program Python
# overhead small; BLOCK_M=32 still gives several row blocks on the test shapes).
_INTERP_FWD = dict(BLOCK_M=32, BLOCK_N=256, BLOCK_K=64, num_warps=4, num_stages=1)
_INTERP_BWD = dict(BLOCK_M=32, BLOCK_N=256, BLOCK_K=64, GROUP_M=2, num_warps=4, num_stages=1)


def fwd_config(n: int, dtype: torch.dtype, interpreting: bool) -> dict:
    """Tile sizes and launch options of the forward kernel (both passes)."""
    if interpreting:
        return dict(_INTERP_FWD)
    cfg = dict(_GPU_FWD["fp32" if dtype == torch.float32 else "16bit"])
    # Small batches: half-height tiles waste less of each wgmma on padding rows.
    cfg.setdefault("BLOCK_M", 128 if n >= 1024 else 64)
    return cfg


def bwd_config(dtype: torch.dtype, interpreting: bool) -> dict:
    """Tile sizes and launch options of the backward kernel."""
    if interpreting:
        return dict(_INTERP_BWD)
    return dict(_GPU_BWD["fp32" if dtype == torch.float32 else "16bit"])


def _teacher_args(hidden, teacher_hidden, teacher_weight, teacher_bias, teacher_logits):
    """Kernel pointer arguments and constexprs of the teacher, fused or dense.

    Unused pointers get a harmless real tensor of the right kind; their constexpr flag is off.
    """
    dense = teacher_logits is not None
    if dense:
        ptrs = (hidden, hidden, hidden, teacher_logits)
        ht = hidden.shape[1]
    else:
        ptrs = (teacher_hidden, teacher_weight, teacher_weight if teacher_bias is None else teacher_bias, teacher_hidden)
        ht = teacher_hidden.shape[1]
    return ptrs, ht, dict(DENSE_TEACHER=dense, HAS_TBIAS=(not dense) and teacher_bias is not None)


def _beta_args(mode: int, beta: float) -> tuple[float, float, float]:
    """(beta, log beta, log(1 - beta)); only mode 2 reads them."""
    if mode == JSD:
        return float(beta), math.log(beta), math.log1p(-beta)
    return 0.0, 0.0, 0.0


def _check_mode(mode: int, beta: float) -> None:
    # The caller validates; these guard the kernels' assumptions (beta 0/1 are modes 0/1).
    if mode not in (FORWARD, REVERSE, JSD):
        raise ValueError(f"linear_kl: mode must be 0 (forward), 1 (reverse) or 2 (jsd), got {mode!r}")
    if mode == JSD and not 0.0 < beta < 1.0:
        raise ValueError(f"linear_kl: beta must be in (0, 1) for mode 2 (jsd), got {beta!r}")


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def linear_kl_fwd(
    hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
    targets, inv_temperature: float, ignore_index: int, mode: int, beta: float,
):
    """(kl[N], lse_s[N], lse_t[N], aux[N]), all float32; see the module docstring for the math.

    aux is KL(S||M) in mode 2 and the KL itself in modes 0 and 1.
    """
    _check_mode(mode, beta)
    n, h = hidden.shape
    v = weight.shape[0]
    interp = interpreting()
    dev = hidden.device
    f32 = dict(dtype=torch.float32, device=dev)
    kl, lse_s, lse_t, aux = (torch.empty(n, **f32) for _ in range(4))
    if n == 0:
        return kl, lse_s, lse_t, aux
    t_ptrs, ht, t_flags = _teacher_args(hidden, teacher_hidden, teacher_weight, teacher_bias, teacher_logits)
    beta_f, log_b, log_1mb = _beta_args(mode, beta)

    g = fwd_grid(n, v, fwd_config(n, hidden.dtype, interp), dev, interp)
    part = kl if g.finalize else torch.empty(5, g.split, n, **f32)
    stats = torch.empty(4, n, **f32) if mode == JSD else kl

    common = dict(
        MODE=mode, HAS_BIAS=bias is not None, FINALIZE=g.finalize, **t_flags, EVEN_KT=ht % g.cfg["BLOCK_K"] == 0,
        **launch_options(g.cfg, h, interp),
    )
    args = (
        hidden, weight, hidden if bias is None else bias, *t_ptrs, targets,
        kl, aux, lse_s, lse_t, stats, part,
        n, h, ht, v, float(inv_temperature), int(ignore_index), beta_f, log_b, log_1mb, g.v_per_split, g.split * n,
    )
    combine_grid = (triton.cdiv(n, COMBINE_BLOCK),)
    combine_args = (part, targets, kl, aux, lse_s, lse_t, stats, n, int(ignore_index), beta_f, g.split, g.split * n)
    with on_device(dev):
        # jsd: the second pass needs the final lse of both sides, so it starts after the first
        # pass (and its combine) has finished for every split.
        for pass_ in (1, 2) if mode == JSD else (1,):
            _linear_kl_fwd_kernel[g.grid](*args, PASS=pass_, **common)
            if not g.finalize:
                _linear_kl_combine_kernel[combine_grid](
                    *combine_args, MODE=mode, PASS=pass_, BLOCK=COMBINE_BLOCK, num_warps=4,
                )
    return kl, lse_s, lse_t, aux


def linear_kl_bwd(
    hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
    targets, lse_s, lse_t, aux, grad_kl, inv_temperature: float, ignore_index: int, mode: int, beta: float,
    need_grad_hidden: bool, need_grad_weight: bool,
):
    """(grad_hidden, grad_weight, grad_bias); each is torch.empty(0) when not requested.

    grad_hidden / grad_weight come back in the input dtype, grad_bias in float32 (computed
    whenever a bias is given).
    """
    _check_mode(mode, beta)
    n, h = hidden.shape
    v = weight.shape[0]
    interp = interpreting()
    ws = GradWorkspaces(hidden, weight, bias, need_grad_hidden, need_grad_weight)

    if n > 0 and ws.needed:
        t_ptrs, ht, t_flags = _teacher_args(hidden, teacher_hidden, teacher_weight, teacher_bias, teacher_logits)
        beta_f, log_b, log_1mb = _beta_args(mode, beta)
        cfg = bwd_config(hidden.dtype, interp)
        with on_device(hidden.device):
            _linear_kl_bwd_kernel[bwd_grid(n, v, cfg)](
                hidden, weight, hidden if bias is None else bias, *t_ptrs, targets, lse_s, lse_t, aux, grad_kl,
                *ws.pointers(lse_s),
                n, h, ht, v, float(inv_temperature), int(ignore_index), beta_f, log_b, log_1mb,
                MODE=mode, HAS_BIAS=ws.need_b, **t_flags, EVEN_KT=ht % cfg["BLOCK_K"] == 0,
                **ws.flags(), **launch_options(cfg, h, interp),
            )
    return ws.grads(hidden, weight)
