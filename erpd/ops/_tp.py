"""Vocabulary-parallel (tensor-parallel) forms of `linear_logprobs`, `linear_kl` and `linear_policy_loss`.

Each rank of ``tp_group`` holds one contiguous shard ``weight[v0 : v0 + V_r, H]`` of the LM head
(``bias[v0 : v0 + V_r]`` with it; shards may be uneven) and the *same* hidden states and targets.
Each rank runs the single-device fused kernels on its shard, which gives per-row statistics
normalized over the shard only; these are combined into the full-vocabulary values with
all-reduces of O(N) float32 tensors (float64 for float64 inputs). No rank ever holds more than a
chunk of its own shard's logits. Every backend works: cpu, cuda and triton through their own
kernels, torch through the PyTorch shard kernels below (same interface, chunked over rows).

Math (per row, shard r with logits z_k, k in r, and its fused-kernel outputs
lse_r = log sum_{k in r} e^{z_k} and H_r = the entropy of softmax over the shard):

    M = max_r lse_r,  s_r = e^{lse_r - M},  S = sum_r s_r,  lse = M + log S,  w_r = s_r / S
    log p_y = z_y - lse                     (z_y from the one shard holding y; 0 elsewhere)
    H = sum_r w_r H_r - sum_r w_r log w_r   (the chain rule of entropy: inside the shards, plus
                                              across them; w_r log w_r = w_r (lse_r - M - log S))

so the forward costs one MAX all-reduce of [N] and one SUM all-reduce of [5, N] (s, s H_r,
s (lse_r - M), z_y, and a 0/1 "this rank holds y" count that checks the shards cover every target).

The backward of every op is the fused kernel's own backward on the shard, fed the *global*
statistics (lse, H; for linear_kl lse^S, lse^T and the aux term): its gradient w.r.t. the shard's
logits is then exactly the full gradient restricted to the shard, so dweight and dbias of the
shard stay local and dhidden is the SUM all-reduce of the ranks' partial products (N·H elements
in hidden's dtype). For a row whose target lies on another rank, the log-prob kernels are given
local id 0 as an anchor (they need some id in range) and the delta term they add at that column,
g_lp (delta_{k,y} - p_k), is taken back out here with an O(N·H) rank-one correction. (That
subtraction leaves column 0's gradient with an absolute fp32 error of order eps·|g_lp|·|h|, the
size of the error on the columns that do hold targets; dhidden is summed in hidden's dtype, so in
bf16 the ranks' partial products are each rounded once before the sum.)

linear_kl: the fused KL kernels return the shard-normalized divergence D_r with lse^S_r, lse^T_r.
With log a_r = lse^T_r - lse^T and log b_r = lse^S_r - lse^S (the shard's mass under teacher and
student), the forward KL and the reverse KL combine exactly:

    KL(T||S) = sum_r a_r [D_r + log a_r - log b_r],   KL(S||T) = sum_r b_r [D_r + log b_r - log a_r]

(one MAX all-reduce of [2, N], one SUM of [2, N], one SUM of [N]). The JSD's mixture does not
factor over shards, so for it a second pass over the shard (PyTorch, chunked over rows) evaluates
the divergence and KL(S||M) with the global normalizers (a SUM all-reduce of [2, N]); it casts a
bf16/fp16 shard (and a fused teacher's) to fp32 once for its GEMMs, V_r·H·4 bytes more memory.

linear_policy_loss: the vocab-parallel log-probs and entropy (identical on every rank after the
all-reduces) go through `erpd.policy_loss`; its gradient flows back into the vocab-parallel
log-prob backward, so gspo and the sequence aggregations need nothing special.

Shard offsets: ``vocab_start`` (this rank's v0) if the caller passes it, else one all-gather of
the shard sizes per call (an int64 per rank, read on the host: with NCCL that is a sync, so pass
``vocab_start`` in a training loop). Every rank must call the op with the same N, arguments and
``requires_grad`` pattern, as with any collective.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist

from erpd import backends
from erpd.ops import _validate
from erpd.ops._autograd import first_order_only

_CHUNK_BYTES = 32 << 20  # logits of one row chunk in the PyTorch passes (student, teacher and temporaries)


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    dist.all_reduce(t, op=op, group=group)
    return t


def shard_start(weight: torch.Tensor, group, vocab_start: int | None) -> int:
    """This rank's first vocabulary id: ``vocab_start``, or the sum of the lower ranks' shard sizes."""
    if vocab_start is not None:
        return vocab_start
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    size = torch.tensor([weight.shape[0]], dtype=torch.int64, device=weight.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    return int(sum(int(s.item()) for s in sizes[:rank]))


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rows_per_chunk(n: int, v: int, buffers: int) -> int:
    return max(1, min(n, _CHUNK_BYTES // max(1, buffers * 8 * v)))


def _autocast_off(fn):
    """Runs a PyTorch pass (first argument: hidden) with torch.autocast off: its GEMMs must stay
    in the accumulation dtype (the public ops cast the inputs as autocast would beforehand)."""

    @functools.wraps(fn)
    def run(hidden, *args):
        with torch.autocast(hidden.device.type, enabled=False):
            return fn(hidden, *args)

    return run


# The `torch` backend's shard kernels: the fused backends' (fwd, bwd) interface in plain PyTorch,
# chunked over rows (only [rows, V_r] logits at a time), in float64 for float64 inputs.


@_autocast_off
def _torch_logprobs_fwd(hidden, weight, bias, targets, inv_t, softcap_scale, ignore_index, with_stats):
    assert softcap_scale == 0.0 and not with_stats, "not with tp_group (erpd.linear_logprobs refuses it)"
    acc = _acc(hidden)
    n = hidden.shape[0]
    w, b = weight.to(acc), (None if bias is None else bias.to(acc))
    logp, ent, lse = (torch.zeros(n, dtype=acc, device=hidden.device) for _ in range(3))
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    rows = _rows_per_chunk(n, weight.shape[0], 3)
    for r0 in range(0, n, rows):
        sl = slice(r0, r0 + rows)
        z = torch.nn.functional.linear(hidden[sl].to(acc), w, b) * inv_t
        l = torch.logsumexp(z, 1)
        logq = z - l[:, None]
        lse[sl] = l
        logp[sl] = logq.gather(1, safe[sl, None]).squeeze(1)
        ent[sl] = -(logq.exp() * logq).sum(1)
    zero = logp.new_zeros(())
    return torch.where(valid, logp, zero), torch.where(valid, ent, zero), torch.where(valid, lse, zero), None


class _ShardGrads:
    """dhidden, dweight, dbias of the PyTorch shard kernels, accumulated chunk by chunk in `acc`."""

    def __init__(self, hidden, weight, bias, acc, need_h, need_w):
        n, v, dev = hidden.shape[0], weight.shape[0], hidden.device
        self.hidden, self.weight = hidden, weight
        self.gh = torch.zeros(n, hidden.shape[1], dtype=acc, device=dev) if need_h else None
        self.gw = torch.zeros(v, weight.shape[1], dtype=acc, device=dev) if need_w else None
        self.gb = torch.zeros(v, dtype=acc, device=dev) if bias is not None else None

    def add(self, dz, h, w, sl):
        """One row chunk `sl`: dz [rows, V_r], its hidden rows h and the (accumulation-dtype) shard w."""
        if self.gh is not None:
            self.gh[sl] = dz @ w
        if self.gw is not None:
            self.gw.addmm_(dz.T, h)
        if self.gb is not None:
            self.gb += dz.sum(0)

    def finish(self):
        empty = self.hidden.new_empty(0)
        return (
            empty if self.gh is None else self.gh.to(self.hidden.dtype),
            empty if self.gw is None else self.gw.to(self.weight.dtype),
            empty if self.gb is None else self.gb,
        )


@_autocast_off
def _torch_logprobs_bwd(hidden, weight, bias, targets, lse, ent, g_lp, g_ent, inv_t, softcap_scale, ignore_index,
                        need_h, need_w):
    acc = _acc(hidden)
    n, v = hidden.shape[0], weight.shape[0]
    w, b = weight.to(acc), (None if bias is None else bias.to(acc))
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    grads = _ShardGrads(hidden, weight, bias, acc, need_h, need_w)
    g = torch.where(valid, g_lp.to(acc), 0.0) * inv_t
    g_h = None if g_ent is None else torch.where(valid, g_ent.to(acc), 0.0) * inv_t
    rows = _rows_per_chunk(n, v, 3)
    for r0 in range(0, n, rows):
        sl = slice(r0, r0 + rows)
        h = hidden[sl].to(acc)
        logq = torch.nn.functional.linear(h, w, b) * inv_t - lse[sl, None]
        p = logq.exp()
        dz = -p * g[sl, None]
        if g_h is not None:
            dz -= g_h[sl, None] * p * (logq + ent[sl, None])
        dz.scatter_add_(1, safe[sl, None], g[sl, None])
        grads.add(dz, h, w, sl)
    return grads.finish()


def _torch_teacher(th, tw, tb, tl, sl, acc, inv_t):
    if tl is not None:
        return tl[sl].to(acc) * inv_t
    return torch.nn.functional.linear(th[sl].to(acc), tw.to(acc), None if tb is None else tb.to(acc)) * inv_t


@_autocast_off
def _torch_kl_fwd(hidden, weight, bias, th, tw, tb, tl, targets, inv_t, ignore_index, mode, beta):
    """Shard-normalized (kl, lse_s, lse_t, aux) for mode 0 (forward) and 1 (reverse)."""
    assert mode in (0, 1)
    acc = _acc(hidden)
    n = hidden.shape[0]
    w, b = weight.to(acc), (None if bias is None else bias.to(acc))
    kl, ls, lt = (torch.zeros(n, dtype=acc, device=hidden.device) for _ in range(3))
    rows = _rows_per_chunk(n, weight.shape[0], 4)
    for r0 in range(0, n, rows):
        sl = slice(r0, r0 + rows)
        zs = torch.nn.functional.linear(hidden[sl].to(acc), w, b) * inv_t
        zt = _torch_teacher(th, tw, tb, tl, sl, acc, inv_t)
        ls[sl], lt[sl] = torch.logsumexp(zs, 1), torch.logsumexp(zt, 1)
        a, bt = zs - ls[sl, None], zt - lt[sl, None]
        kl[sl] = (bt.exp() * (bt - a)).sum(1) if mode == 0 else (a.exp() * (a - bt)).sum(1)
    valid = targets != ignore_index
    kl = torch.where(valid, kl, 0.0)
    return kl, ls, lt, kl


@_autocast_off
def _torch_kl_bwd(hidden, weight, bias, th, tw, tb, tl, targets, lse_s, lse_t, aux, g_kl, inv_t, ignore_index, mode,
                  beta, need_h, need_w):
    acc = _acc(hidden)
    n, v = hidden.shape[0], weight.shape[0]
    w, b = weight.to(acc), (None if bias is None else bias.to(acc))
    g = torch.where(targets != ignore_index, g_kl.to(acc), 0.0) * inv_t
    grads = _ShardGrads(hidden, weight, bias, acc, need_h, need_w)
    rows = _rows_per_chunk(n, v, 5)
    for r0 in range(0, n, rows):
        sl = slice(r0, r0 + rows)
        h = hidden[sl].to(acc)
        a = torch.nn.functional.linear(h, w, b) * inv_t - lse_s[sl, None]
        bt = _torch_teacher(th, tw, tb, tl, sl, acc, inv_t) - lse_t[sl, None]
        ps = a.exp()
        if mode == 0:
            dz = ps - bt.exp()
        elif mode == 1:
            dz = ps * (a - bt - aux[sl, None])
        else:
            log_m = torch.logaddexp(a + math.log1p(-beta), bt + math.log(beta))
            dz = (1.0 - beta) * ps * (a - log_m - aux[sl, None])
        dz = dz * g[sl, None]
        grads.add(dz, h, w, sl)
    return grads.finish()


def _kernels(backend: str, op: str):
    """(fwd, bwd) of the shard kernels of `op` for a resolved backend."""
    if backend == "torch":
        return (_torch_logprobs_fwd, _torch_logprobs_bwd) if op == "linear_logprobs" else (_torch_kl_fwd, _torch_kl_bwd)
    if op == "linear_logprobs":
        from erpd.ops.linear_logprobs import _impl
    else:
        from erpd.ops.linear_kl import _impl
    return _impl(backend)


def _resolve(backend: str, hidden: torch.Tensor, op: str) -> str:
    name = backends.resolve(backend, hidden.device, op)
    if hidden.dtype == torch.float64 and name != "torch":
        raise TypeError(f"backend={name!r} supports fp32/bf16/fp16 inputs; float64 runs only on backend='torch'")
    return name


# --------------------------------------------------------------------------------------------
# linear_logprobs
# --------------------------------------------------------------------------------------------


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


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, v0, inv_t, ignore_index, backend, group, check_values,
                reduce_grad_hidden):
        fwd, _ = _kernels(backend, "linear_logprobs")
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

        m = _all_reduce(lse_r.clone(), dist.ReduceOp.MAX, group)
        s = torch.exp(lse_r - m)
        stats = torch.stack([s, s * ent_r, s * (lse_r - m), torch.where(mine, logp_r + lse_r, zero), mine.to(zero.dtype)])
        s_sum, s_ent, s_log, z_y, found = _all_reduce(stats, dist.ReduceOp.SUM, group).unbind()
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
    @first_order_only("linear_logprobs")
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
        _, bwd = _kernels(backend, "linear_logprobs")
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
                _all_reduce(gh, dist.ReduceOp.SUM, group)
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
    name = _resolve(backend, hidden, "linear_logprobs")
    v0 = shard_start(weight, tp_group, vocab_start)
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    if h2.shape[0] == 0:
        empty = (h2.sum(-1) + weight.sum() * 0).to(_acc(hidden))
        return empty.reshape(lead), (empty.reshape(lead) if with_entropy else None)
    logp, entropy = _VocabParallelLogprobs.apply(
        h2, weight.contiguous(), None if bias is None else bias.contiguous(), targets.reshape(-1).contiguous(),
        v0, 1.0 / temperature, ignore_index, name, tp_group, check_values, reduce_grad_hidden,
    )
    return logp.reshape(lead), (entropy.reshape(lead) if with_entropy else None)


# --------------------------------------------------------------------------------------------
# linear_kl
# --------------------------------------------------------------------------------------------


@_autocast_off
def _jsd_partials(hidden, weight, bias, th, tw, tb, tl, lse_s, lse_t, inv_t, beta):
    """This shard's part of the JSD and of KL(S||M) with the global normalizers, [2, N] f32,
    chunked over rows so that only [rows, V_r] fp32 logits exist at a time."""
    n = hidden.shape[0]
    acc = lse_s.dtype
    rows = _rows_per_chunk(n, weight.shape[0], 6)
    w, b = weight.to(acc), (None if bias is None else bias.to(acc))
    log_1mb, log_b = math.log1p(-beta), math.log(beta)
    out = torch.empty(2, n, dtype=acc, device=hidden.device)
    for r0 in range(0, n, rows):
        sl = slice(r0, r0 + rows)
        a = torch.nn.functional.linear(hidden[sl].to(acc), w, b) * inv_t - lse_s[sl, None]
        bt = _torch_teacher(th, tw, tb, tl, sl, acc, inv_t) - lse_t[sl, None]
        log_m = torch.logaddexp(a + log_1mb, bt + log_b)
        kl_sm = (a.exp() * (a - log_m)).sum(1)
        kl_tm = (bt.exp() * (bt - log_m)).sum(1)
        out[0, sl] = beta * kl_tm + (1.0 - beta) * kl_sm
        out[1, sl] = kl_sm
    return out


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, th, tw, tb, tl, mask, inv_t, mode, beta, backend, group):
        fwd, _ = _kernels(backend, "linear_kl")
        # The shard pass: the jsd asks it for the normalizers only (mode 0 is the cheapest).
        d_r, ls_r, lt_r, _ = fwd(hidden, weight, bias, th, tw, tb, tl, mask, inv_t, -1, mode if mode < 2 else 0, beta)
        valid = mask != -1
        zero = ls_r.new_zeros(())
        loc = torch.where(valid, torch.stack([ls_r, lt_r]), zero)
        m = _all_reduce(loc.clone(), dist.ReduceOp.MAX, group)
        lse = m + torch.log(_all_reduce(torch.exp(loc - m), dist.ReduceOp.SUM, group))
        lse_s, lse_t = lse.unbind()
        if mode < 2:
            log_a, log_b = loc[1] - lse_t, loc[0] - lse_s
            if mode == 0:
                part = log_a.exp() * (d_r + log_a - log_b)
            else:
                part = log_b.exp() * (d_r + log_b - log_a)
            kl = _all_reduce(torch.where(valid, part, zero), dist.ReduceOp.SUM, group)
            aux = kl
        else:
            kl, aux = _all_reduce(
                _jsd_partials(hidden, weight, bias, th, tw, tb, tl, lse_s, lse_t, inv_t, beta), dist.ReduceOp.SUM, group
            ).unbind()
        kl = torch.where(valid, kl, zero)
        aux = torch.where(valid, aux, zero)
        ctx.save_for_backward(hidden, weight, bias, th, tw, tb, tl, mask, lse_s.contiguous(), lse_t.contiguous(), aux)
        ctx.args = (inv_t, mode, beta, backend, group)
        return kl

    @staticmethod
    @first_order_only("linear_kl")
    def backward(ctx, grad_kl):
        hidden, weight, bias, th, tw, tb, tl, mask, lse_s, lse_t, aux = ctx.saved_tensors
        inv_t, mode, beta, backend, group = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        _, bwd = _kernels(backend, "linear_kl")
        gh, gw, gb = bwd(
            hidden, weight, bias, th, tw, tb, tl, mask, lse_s, lse_t, aux,
            grad_kl.to(lse_s.dtype).contiguous(), inv_t, -1, mode, beta, need_h, need_w,
        )
        if need_h:
            _all_reduce(gh, dist.ReduceOp.SUM, group)
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
    name = _resolve(backend, hidden, "linear_kl")
    lead = hidden.shape[:-1]
    flat = lambda x, d: None if x is None else x.reshape(-1, d).contiguous()  # noqa: E731
    h2 = flat(hidden, hidden.shape[-1])
    if h2.shape[0] == 0:
        return (h2.sum(-1) + weight.sum() * 0).to(_acc(hidden)).reshape(lead)
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
    kl = _VocabParallelKL.apply(
        h2, weight.contiguous(), None if bias is None else bias.contiguous(), th, tw, tb, tl, mask.contiguous(),
        1.0 / temperature, mode, beta, name, tp_group,
    )
    return kl.reshape(lead)


# --------------------------------------------------------------------------------------------
# linear_policy_loss
# --------------------------------------------------------------------------------------------


def linear_policy_loss(hidden, weight, bias, targets, old_logprobs, advantages, mask, *, temperature, ignore_index,
                       backend, validate, tp_group, vocab_start, **policy_kwargs):
    """The vocab-parallel `erpd.linear_policy_loss`: vocab-parallel log-probs and entropy, then
    `erpd.policy_loss` on them (the same on every rank), which validates the policy arguments.
    Returns (loss, metrics, log-probs)."""
    from erpd.ops.policy_loss import policy_loss

    check_values = _validate.want_value_checks(hidden.device, validate)
    targets = _validate.targets(targets, hidden, 0, ignore_index, False)
    # Every value check runs here, once, as in the unsharded op: the mask still holds the caller's
    # values (policy_loss below sees a bool), so policy_loss is told not to check again.
    old_logprobs, advantages, mask, ref_logprobs, _, is_weights = _validate.policy_tensors(
        targets.shape, hidden.device, old_logprobs, advantages, mask, policy_kwargs.pop("ref_logprobs"), None,
        policy_kwargs.pop("is_weights"), check_values, old_optional=True,
    )
    _validate.num_items(policy_kwargs["num_items"], hidden.device, check_values)
    logp, entropy = linear_logprobs(
        hidden, weight, bias, targets, temperature=temperature, ignore_index=ignore_index, with_entropy=True,
        backend=backend, check_values=check_values, tp_group=tp_group, vocab_start=vocab_start,
    )
    valid = (mask != 0) & (targets != ignore_index)
    loss, metrics = policy_loss(
        logp, logp.detach() if old_logprobs is None else old_logprobs, advantages, valid, entropy=entropy,
        ref_logprobs=ref_logprobs, is_weights=is_weights, backend=backend, validate=False, **policy_kwargs,
    )
    return loss, metrics, logp
