"""The `torch` backend's `linear_kl` kernels: the contracts of erpd/ops/linear_kl/__init__.py
(per-token fwd and bwd, the reduced loss's fwd_with_grads) in plain PyTorch, chunked over rows
(erpd/ops/_torch.py). Also the vocabulary-parallel path's shard kernels when ``backend="torch"``."""

from __future__ import annotations

import math

import torch

from erpd.ops import _library, _torch


def teacher_logits(t_hidden, t_weight, t_bias, t_logits, sl: slice, acc, inv_t: float) -> torch.Tensor:
    """The teacher's (temperature-scaled) logits of row chunk `sl`, fused or dense."""
    if t_logits is not None:
        return t_logits[sl].to(acc) * inv_t
    b = None if t_bias is None else t_bias.to(acc)
    return torch.nn.functional.linear(t_hidden[sl].to(acc), t_weight.to(acc), b) * inv_t


def jsd_rows(a: torch.Tensor, bt: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(JSD_beta, KL(S||M)) per row from the student's and the teacher's log-probs a, bt, with
    M = (1 - beta) S + beta T (0 < beta < 1)."""
    log_m = torch.logaddexp(a + math.log1p(-beta), bt + math.log(beta))
    kl_sm = _torch.expect(a, a - log_m)
    kl_tm = _torch.expect(bt, bt - log_m)
    return beta * kl_tm + (1.0 - beta) * kl_sm, kl_sm


@_torch.autocast_off
def fwd(hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, targets, inv_temperature, ignore_index, mode,
        beta):
    """(kl, lse_s, lse_t, aux): aux = KL(S||T) for mode 1, KL(S||M) for mode 2 (what bwd needs)."""
    acc = _torch.acc_dtype(hidden)
    n, dev = hidden.shape[0], hidden.device
    head = _torch.Head(weight, bias, inv_temperature, 0.0, acc)
    kl, aux, lse_s, lse_t = (torch.zeros(n, dtype=acc, device=dev) for _ in range(4))
    for sl in _torch.row_chunks(n, weight.shape[0], 4):
        zs = head.logits(hidden[sl].to(acc))
        zt = teacher_logits(t_hidden, t_weight, t_bias, t_logits, sl, acc, inv_temperature)
        lse_s[sl], lse_t[sl] = torch.logsumexp(zs, 1), torch.logsumexp(zt, 1)
        a, bt = zs - lse_s[sl, None], zt - lse_t[sl, None]
        if mode == 0:
            kl[sl] = _torch.expect(bt, bt - a)
        elif mode == 1:
            kl[sl] = aux[sl] = _torch.expect(a, a - bt)
        else:
            kl[sl], aux[sl] = jsd_rows(a, bt, beta)
    valid = targets != ignore_index
    zero = kl.new_zeros(())
    # A divergence is >= 0; rounding can leave -1e-10 where the two distributions agree.
    return torch.where(valid, kl.clamp_min(0.0), zero), lse_s, lse_t, torch.where(valid, aux, zero)


@_torch.autocast_off
def bwd(hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, targets, lse_s, lse_t, aux, grad_kl,
        inv_temperature, ignore_index, mode, beta, need_grad_hidden, need_grad_weight):
    acc = _torch.acc_dtype(hidden)
    head = _torch.Head(weight, bias, inv_temperature, 0.0, acc)
    valid = targets != ignore_index
    g = torch.where(valid, grad_kl.to(acc), 0.0)
    grads = _torch.Grads(hidden, weight, bias, acc, need_grad_hidden, need_grad_weight)
    for sl in _torch.row_chunks(hidden.shape[0], weight.shape[0], 5):
        h = hidden[sl].to(acc)
        zs = head.logits(h)
        a = zs - lse_s[sl, None]
        bt = teacher_logits(t_hidden, t_weight, t_bias, t_logits, sl, acc, inv_temperature) - lse_t[sl, None]
        ps = a.exp()
        if mode == 0:  # d KL(T||S) / dz = p_S - p_T
            dz = ps - bt.exp()
        elif mode == 1:  # d KL(S||T) / dz = p_S (log p_S - log p_T - KL)
            dz = ps * (a - bt - aux[sl, None])
        else:  # d JSD / dz = (1 - beta) p_S (log p_S - log m - KL(S||M))
            log_m = torch.logaddexp(a + math.log1p(-beta), bt + math.log(beta))
            dz = (1.0 - beta) * ps * (a - log_m - aux[sl, None])
        # Reverse KL and JSD: where p_S = 0 (a masked, -inf student logit) the gradient is 0, not
        # 0 · inf. An ignored row gets none.
        keep = valid[sl, None] if mode == 0 else (ps > 0) & valid[sl, None]
        dz = torch.where(keep, dz * g[sl, None], 0.0)
        grads.add(head.dy(dz, zs), h, head.w, sl)
    return grads.finish()


def fwd_with_grads(hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, targets, grad_kl, inv_temperature,
                   ignore_index, mode, beta, need_grad_hidden, need_grad_weight):
    """The reduced loss's contract: (kl, grad_hidden, grad_weight, grad_bias) of sum_i grad_kl_i kl_i
    (the forward and the backward back to back: 12·N·H·V, where the C++ kernel does 8)."""
    kl, lse_s, lse_t, aux = fwd(hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, targets, inv_temperature,
                                ignore_index, mode, beta)
    gh, gw, gb = bwd(hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, targets, lse_s, lse_t, aux, grad_kl,
                     inv_temperature, ignore_index, mode, beta, need_grad_hidden, need_grad_weight)
    return kl, gh, gw, gb


_library.register_torch("linear_kl_fwd", fwd)
_library.register_torch("linear_kl_bwd", bwd)
_library.register_torch("linear_kl_fwd_with_grads", fwd_with_grads)
