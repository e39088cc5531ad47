"""The `torch` backend's `linear_logprobs` kernels: the (fwd, bwd) contract of
erpd/ops/linear_logprobs/__init__.py in plain PyTorch, chunked over rows (erpd/ops/_torch.py).
Also the vocabulary-parallel path's shard kernels when ``backend="torch"``."""

from __future__ import annotations

import torch

from erpd.ops import _library, _torch


@_torch.autocast_off
def fwd(hidden, weight, bias, targets, inv_temperature, softcap_scale, ignore_index, with_stats):
    acc = _torch.acc_dtype(hidden)
    n, dev = hidden.shape[0], hidden.device
    head = _torch.Head(weight, bias, inv_temperature, softcap_scale, acc)
    logp, ent, lse = (torch.zeros(n, dtype=acc, device=dev) for _ in range(3))
    stats = torch.zeros((3, n) if with_stats else (0,), dtype=acc, device=dev)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    for sl in _torch.row_chunks(n, weight.shape[0], 3):
        z = head.logits(hidden[sl].to(acc))
        lse[sl] = torch.logsumexp(z, 1)
        logq = z - lse[sl, None]
        logp[sl] = logq.gather(1, safe[sl, None]).squeeze(1)
        ent[sl] = -_torch.expect(logq, logq)
        if with_stats:
            stats[0, sl] = torch.logsumexp(2.0 * logq, 1)
            stats[1, sl] = z.mean(1)
            stats[2, sl] = (z.argmax(1) == safe[sl]).to(acc)
    zero = logp.new_zeros(())
    if with_stats:
        stats = torch.where(valid, stats, zero)
    return torch.where(valid, logp, zero), torch.where(valid, ent, zero), torch.where(valid, lse, zero), stats


@_torch.autocast_off
def bwd(hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy, inv_temperature, softcap_scale,
        ignore_index, need_grad_hidden, need_grad_weight):
    acc = _torch.acc_dtype(hidden)
    head = _torch.Head(weight, bias, inv_temperature, softcap_scale, acc)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    g = torch.where(valid, grad_logprobs.to(acc), 0.0)
    g_ent = None if grad_entropy is None else torch.where(valid, grad_entropy.to(acc), 0.0)
    grads = _torch.Grads(hidden, weight, bias, acc, need_grad_hidden, need_grad_weight)
    for sl in _torch.row_chunks(hidden.shape[0], weight.shape[0], 4):
        h = hidden[sl].to(acc)
        z = head.logits(h)
        logq = z - lse[sl, None]
        p = logq.exp()
        # d logp_y / dz = δ_y - p;  d H / dz = -p (log p + H)
        dz = -p * g[sl, None]
        if g_ent is not None:  # (where p = 0, a masked -inf logit, the term is 0, not 0 · inf)
            dz -= g_ent[sl, None] * p * (torch.where(p > 0, logq, 0.0) + entropy[sl, None])
        dz.scatter_add_(1, safe[sl, None], g[sl, None])
        dz = torch.where(valid[sl, None], dz, 0.0)  # an ignored row's lse is 0, so its p may overflow
        grads.add(head.dy(dz, z), h, head.w, sl)
    return grads.finish()


_library.register_torch("linear_logprobs_fwd", fwd)
_library.register_torch("linear_logprobs_bwd", bwd)
