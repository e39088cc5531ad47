"""The vocabulary-parallel `linear_kl` (erpd/ops/_tp.py: the sharding and what every op's
parallel form shares).

The kernels return the shard-normalized divergence D_r with lse^S_r, lse^T_r. With log a_r =
lse^T_r - lse^T and log b_r = lse^S_r - lse^S (the shard's mass under teacher and student), the
forward KL and the reverse KL combine exactly:

    KL(T||S) = sum_r a_r [D_r + log a_r - log b_r],   KL(S||T) = sum_r b_r [D_r + log b_r - log a_r]

(one MAX all-reduce of [2, N], one SUM of [2, N], one SUM of [N]). The JSD's mixture does not
factor over shards, so for it a second pass over the shard (PyTorch, chunked over rows) evaluates
the divergence and KL(S||M) with the global normalizers (a SUM all-reduce of [2, N]); it casts a
bf16/fp16 shard (and a fused teacher's) to fp32 once for its GEMMs, V_r·H·4 bytes more memory.
The backward is the kernel's own, fed the global lse^S, lse^T and aux.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from erpd.ops import _autograd, _torch, _tp, _validate
from erpd.ops.linear_kl import torch_kernels
from erpd.ops.linear_kl.function import kernels



@_torch.autocast_off
def _jsd_partials(hidden, weight, bias, th, tw, tb, tl, lse_s, lse_t, inv_t, beta):
    """This shard's part of the JSD and of KL(S||M) with the global normalizers, [2, N], chunked
    over rows so that only [rows, V_r] logits exist at a time."""
    acc = lse_s.dtype
    head = _torch.Head(weight, bias, inv_t, 0.0, acc)
    out = torch.empty(2, hidden.shape[0], dtype=acc, device=hidden.device)
    for sl in _torch.row_chunks(hidden.shape[0], weight.shape[0], 6):
        a = head.logits(hidden[sl].to(acc)) - lse_s[sl, None]
        bt = torch_kernels.teacher_logits(th, tw, tb, tl, sl, acc, inv_t) - lse_t[sl, None]
        out[0, sl], out[1, sl] = torch_kernels.jsd_rows(a, bt, beta)
    return out


class VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, th, tw, tb, tl, mask, inv_t, mode, beta, backend, group):
        fwd, _ = kernels(backend)
        # The shard pass: the jsd asks it for the normalizers only (mode 0 is the cheapest).
        d_r, ls_r, lt_r, _ = fwd(hidden, weight, bias, th, tw, tb, tl, mask, inv_t, -1, mode if mode < 2 else 0, beta)
        valid = mask != -1
        zero = ls_r.new_zeros(())
        loc = torch.where(valid, torch.stack([ls_r, lt_r]), zero)
        m = _tp.all_reduce(loc.clone(), dist.ReduceOp.MAX, group)
        lse = m + torch.log(_tp.all_reduce(torch.exp(loc - m), dist.ReduceOp.SUM, group))
        lse_s, lse_t = lse.unbind()
        if mode < 2:
            log_a, log_b = loc[1] - lse_t, loc[0] - lse_s
            if mode == 0:
                part = log_a.exp() * (d_r + log_a - log_b)
            else:
                part = log_b.exp() * (d_r + log_b - log_a)
            kl = _tp.all_reduce(torch.where(valid, part, zero), dist.ReduceOp.SUM, group)
            aux = kl
        else:
            kl, aux = _tp.all_reduce(
                _jsd_partials(hidden, weight, bias, th, tw, tb, tl, lse_s, lse_t, inv_t, beta), dist.ReduceOp.SUM, group
            ).unbind()
        kl = torch.where(valid, kl, zero)
        aux = torch.where(valid, aux, zero)
        ctx.save_for_backward(hidden, weight, bias, th, tw, tb, tl, mask, lse_s.contiguous(), lse_t.contiguous(), aux)
        ctx.args = (inv_t, mode, beta, backend, group)
        return kl

    @staticmethod
    @_autograd.first_order_only("linear_kl")
    def backward(ctx, grad_kl):
        hidden, weight, bias, th, tw, tb, tl, mask, lse_s, lse_t, aux = ctx.saved_tensors
        inv_t, mode, beta, backend, group = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        _, bwd = kernels(backend)
        gh, gw, gb = bwd(
            hidden, weight, bias, th, tw, tb, tl, mask, lse_s, lse_t, aux,
            grad_kl.to(lse_s.dtype).contiguous(), inv_t, -1, mode, beta, need_h, need_w,
        )
        if need_h:
            _tp.all_reduce(gh, dist.ReduceOp.SUM, group)
        gb = gb.to(bias.dtype) if (need_b and bias is not None) else None
        return (gh if need_h else None), (gw if need_w else None), gb, *([None] * 10)


def linear_kl(hidden, weight, bias, targets, form, teacher, *, mode, beta, temperature, ignore_index, backend,
              tp_group, vocab_start):
    """The vocab-parallel `erpd.linear_kl`, fused or dense (shard-sliced) teacher; `vocab_start` is
    only checked: the divergence does not depend on where the shard sits."""
    _validate.vocab_shard(tp_group, weight, vocab_start)
    if targets is not None:
        targets = _validate.targets(targets, hidden, 0, ignore_index, False)
    if form == "topk":
        raise ValueError(
            "tp_group supports a fused teacher (teacher_weight sharded like weight) or teacher_logits sliced to the "
            "shard; teacher_topk's ids span the whole vocabulary and are not supported with tp_group"
        )
    name = _tp.resolve(backend, hidden, "linear_kl")
    lead = hidden.shape[:-1]
    flat = lambda x, d: None if x is None else x.reshape(-1, d).contiguous()  # noqa: E731
    h2 = flat(hidden, hidden.shape[-1])
    if h2.shape[0] == 0:
        return (h2.sum(-1) + weight.sum() * 0).to(_torch.acc_dtype(hidden)).reshape(lead)
    # targets only mask rows here: 0 = counts, -1 = ignored (the kernels never index with them).
    mask = torch.zeros(h2.shape[0], dtype=torch.long, device=hidden.device)
    if targets is not None:
        mask = torch.where(targets.reshape(-1) == ignore_index, -1, mask)
    if form == "fused":
        th, tw, tb = teacher
        th, tw, tl = flat(th.detach(), th.shape[-1]), tw.detach().contiguous(), None
        tb = None if tb is None else tb.detach().contiguous()
    else:
        th = tw = tb = None
        tl = flat(teacher[0].detach(), weight.shape[0])
    kl = VocabParallelKL.apply(
        h2, weight.contiguous(), None if bias is None else bias.contiguous(), th, tw, tb, tl, mask.contiguous(),
        1.0 / temperature, mode, beta, name, tp_group,
    )
    return kl.reshape(lead)
