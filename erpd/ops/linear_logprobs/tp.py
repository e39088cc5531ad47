"""The vocabulary-parallel `linear_logprobs` (erpd/ops/_tp.py: the sharding and what every op's
parallel form shares).

Math (per row, shard r with logits z_k, k in r, and its kernel outputs lse_r = log sum_{k in r}
e^{z_k} and H_r = the entropy of softmax over the shard):

    M = max_r lse_r,  s_r = e^{lse_r - M},  S = sum_r s_r,  lse = M + log S,  w_r = s_r / S
    log p_y = z_y - lse                     (z_y from the one shard holding y; 0 elsewhere)
    H = sum_r w_r H_r - sum_r w_r log w_r   (the chain rule of entropy: inside the shards, plus
                                              across them; w_r log w_r = w_r (lse_r - M - log S))

so the forward costs one MAX all-reduce of [N] and one SUM all-reduce of [5, N] (s, s H_r,
s (lse_r - M), z_y, and a 0/1 "this rank holds y" count that checks the shards cover every target).

The backward is the kernel's own backward on the shard, fed the global lse and H. For a row whose
target lies on another rank, the kernels are given local id 0 as an anchor (they need some id in
range) and the delta term they add at that column, g_lp (delta_{k,y} - p_k), is taken back out
here with an O(N·H) rank-one correction. (That subtraction leaves column 0's gradient with an
absolute fp32 error of order eps·|g_lp|·|h|, the size of the error on the columns that do hold
targets; dhidden is summed in hidden's dtype, so in bf16 the ranks' partial products are each
rounded once before the sum.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from erpd.ops import _autograd, _torch, _tp, _validate
from erpd.ops.linear_logprobs.function import kernels



def _check_cover(found: torch.Tensor, valid: torch.Tensor, targets: torch.Tensor) -> None:
    """Each non-ignored target must be held by exactly one rank's shard (value check, host read)."""
    bad = valid & (found.round() != 1)
    if bool(bad.any()):
        first = int(targets[bad][0])
        raise ValueError(
            f"targets must lie in the union of the ranks' vocabulary shards (each id on exactly one rank); "
            f"target {first} is held by {int(found[bad][0].round())} ranks ({int(bad.sum())} such rows); "
            "check vocab_start and the targets' range"
        )


class VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, v0, inv_t, ignore_index, backend, group, check_values,
                reduce_grad_hidden):
        fwd, _ = kernels(backend)
        n, v_r = targets.shape[0], weight.shape[0]
        valid = targets != ignore_index
        local = targets - v0
        mine = valid & (local >= 0) & (local < v_r)
        # Rows whose target is on another rank get the anchor id 0 (its delta is undone in backward);
        # ignored rows keep ignore_index, so the kernels give them zeros and zero gradient.
        kt = torch.where(mine, local, torch.where(valid, torch.zeros_like(local), torch.full_like(local, ignore_index)))
        logp_r, ent_r, lse_r, _ = fwd(hidden, weight, bias, kt, inv_t, 0.0, ignore_index, False)
        zero = lse_r.new_zeros(())
        lse_r = torch.where(valid, lse_r, zero)
        ent_r = torch.where(valid, ent_r, zero)

        m = _tp.all_reduce(lse_r.clone(), dist.ReduceOp.MAX, group)
        s = torch.exp(lse_r - m)
        stats = torch.stack([s, s * ent_r, s * (lse_r - m), torch.where(mine, logp_r + lse_r, zero), mine.to(zero.dtype)])
        s_sum, s_ent, s_log, z_y, found = _tp.all_reduce(stats, dist.ReduceOp.SUM, group).unbind()
        if check_values:
            _check_cover(found, valid, targets)
        log_s = torch.log(s_sum)
        lse = m + log_s
        entropy = s_ent / s_sum - s_log / s_sum + log_s
        logp = torch.where(valid, z_y - lse, zero)
        entropy = torch.where(valid, entropy, zero)
        anchored = valid & ~mine
        ctx.save_for_backward(hidden, weight, bias, kt, lse, entropy, anchored)
        ctx.args = (inv_t, ignore_index, backend, group, reduce_grad_hidden)
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    @_autograd.first_order_only("linear_logprobs")
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, kt, lse, entropy, anchored = ctx.saved_tensors
        inv_t, ignore_index, backend, group, reduce_grad_hidden = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_logp is None and grad_entropy is None:
            # Every rank sees the same graph, so every rank skips the all-reduce together.
            return (None,) * 11
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        acc = lse.dtype
        g_lp = grad_logp.to(acc).contiguous()
        _, bwd = kernels(backend)
        gh, gw, gb = bwd(
            hidden, weight, bias, kt, lse, entropy, g_lp,
            None if grad_entropy is None else grad_entropy.to(acc).contiguous(),
            inv_t, 0.0, ignore_index, need_h, need_w,
        )
        # Undo the anchor's delta: dz_0 -= g_lp on rows whose target is elsewhere (times t, as the
        # kernels fold the temperature into dz).
        c = torch.where(anchored, g_lp, g_lp.new_zeros(())) * inv_t
        if need_h:
            gh.sub_((c.unsqueeze(1) * weight[0].to(acc)).to(gh.dtype))
            if reduce_grad_hidden:
                _tp.all_reduce(gh, dist.ReduceOp.SUM, group)
        if need_w:
            with torch.autocast(hidden.device.type, enabled=False):
                gw[0].sub_((c @ hidden.to(acc)).to(gw.dtype))
        if need_b and bias is not None:
            gb = gb.to(acc)
            gb[0] -= c.sum()
            gb = gb.to(bias.dtype)
        else:
            gb = None
        return (gh if need_h else None), (gw if need_w else None), gb, *([None] * 8)


def linear_logprobs(hidden, weight, bias, targets, *, temperature, ignore_index, with_entropy, backend, check_values,
                    tp_group, vocab_start, reduce_grad_hidden=True):
    """The vocab-parallel `erpd.linear_logprobs`; the caller has validated all but `targets`, whose
    range only the ranks together can check (`_check_cover`). reduce_grad_hidden=False leaves the
    SUM of the ranks' dhidden to the caller."""
    vocab_start = _validate.vocab_shard(tp_group, weight, vocab_start)
    targets = _validate.targets(targets, hidden, 0, ignore_index, False)
    name = _tp.resolve(backend, hidden, "linear_logprobs")
    v0 = _tp.shard_start(weight, tp_group, vocab_start)
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    if h2.shape[0] == 0:
        empty = (h2.sum(-1) + weight.sum() * 0).to(_torch.acc_dtype(hidden))
        return empty.reshape(lead), (empty.reshape(lead) if with_entropy else None)
    logp, entropy = VocabParallelLogprobs.apply(
        h2, weight.contiguous(), None if bias is None else bias.contiguous(), targets.reshape(-1).contiguous(),
        v0, 1.0 / temperature, ignore_index, name, tp_group, check_values, reduce_grad_hidden,
    )
    return logp.reshape(lead), (entropy.reshape(lead) if with_entropy else None)
