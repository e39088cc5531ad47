"""The autograd Functions of `linear_kl`: the per-token form over the backend's (fwd, bwd)
kernels, the top-k teacher over the `linear_logprobs` kernels, and the reduced loss's
gradients-in-the-forward run (`reduced_loss`, for `erpd.ops._autograd.GradsInForward`)."""

from __future__ import annotations

import torch

from erpd import reference
from erpd.ops import _autograd, _library
from erpd.ops.linear_kl import library, torch_kernels  # noqa: F401  (they register the kernels)
from erpd.ops.linear_logprobs.function import kernels as logprobs_kernels

OP = "linear_kl"
DIRECTIONS = reference.KL_DIRECTIONS
MODES = {"forward": 0, "reverse": 1, "jsd": 2}


def kernels(backend: str):
    """(fwd, bwd) of `backend` for the fused and dense teacher forms."""
    return _library.impl(backend, "linear_kl_fwd"), _library.impl(backend, "linear_kl_bwd")


def reference_kl(hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, targets, inv_t, ignore_index, mode,
                 beta):
    """The per-token divergence by its definition (erpd.reference), for the torch backend's
    gradients of gradients."""
    teacher = (dict(teacher_logits=t_logits) if t_logits is not None
               else dict(teacher_hidden=t_hidden, teacher_weight=t_weight, teacher_bias=t_bias))
    return reference.linear_kl(hidden, weight, targets, bias=bias, direction=DIRECTIONS[mode], beta=beta,
                               temperature=1.0 / inv_t, ignore_index=ignore_index, **teacher)


class KLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, targets, inv_t, ignore_index, mode, beta, backend):
        fwd, _ = kernels(backend)
        kl, lse_s, lse_t, aux = fwd(hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, targets, inv_t,
                                    ignore_index, mode, beta)
        ctx.save_for_backward(hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, targets, lse_s, lse_t, aux)
        ctx.args = (inv_t, ignore_index, mode, beta, backend)
        if backend == "torch":
            teacher = (t_hidden, t_weight, t_bias, t_logits, targets, inv_t, ignore_index, mode, beta)
            _autograd.record_recompute(ctx, lambda h, w, b: (reference_kl(h, w, b, *teacher),), (hidden, weight, bias), 13)
        return kl

    @staticmethod
    @_autograd.first_order_only(OP)
    def backward(ctx, grad_kl):
        hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, targets, lse_s, lse_t, aux = ctx.saved_tensors
        inv_t, ignore_index, mode, beta, backend = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        _, bwd = kernels(backend)
        gh, gw, gb = bwd(
            hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, targets, lse_s, lse_t, aux,
            grad_kl.to(lse_s.dtype).contiguous(), inv_t, ignore_index, mode, beta, need_h, need_w,
        )
        gb = gb.to(bias.dtype) if (need_b and bias is not None) else None
        return (gh if need_h else None), (gw if need_w else None), gb, *([None] * 10)


def _gather_logits(hidden, weight, bias, ids, inv_t, acc, budget_bytes=64 << 20):
    """The student's logits (accumulation dtype) at `ids` [N, k]: rows of the head gathered a chunk of tokens at a time,
    so the [rows, k, H] gather stays within a byte budget."""
    n, k = ids.shape
    h = hidden.shape[1]
    rows = max(1, min(n, budget_bytes // max(1, 4 * k * h)))
    out = torch.empty(n, k, dtype=acc, device=hidden.device)
    for r0 in range(0, n, rows):
        sl = slice(r0, r0 + rows)
        w_k = weight[ids[sl]].to(acc)  # [r, k, H]
        z = torch.bmm(w_k, hidden[sl].to(acc).unsqueeze(-1)).squeeze(-1)
        if bias is not None:
            z += bias.to(acc)[ids[sl]]
        out[sl] = z * inv_t
    return out


class TopkFunction(torch.autograd.Function):
    """Forward KL to a top-k teacher with a tail bucket (see `erpd.reference.linear_kl`).

    With q^S_K the student's probabilities at the k ids, tails t^T = 1 - sum q^T_K and
    t^S = 1 - sum q^S_K, and c = t^T / t^S (0 where t^S hit its floor, whose derivative is 0),
    the gradient w.r.t. the student's (temperature-scaled) logits is
        dz_j = alpha q^S_j + [j in K] (c q^S_j - q^T_j),   alpha = sum q^T_K - c sum q^S_K.
    The dense part alpha q^S is what `linear_logprobs`' backward produces for grad_logprobs =
    -alpha (plus +alpha at its target, folded into the sparse part), so the backend's own
    log-prob kernels do the vocabulary pass; the k sparse columns are gathered and scattered
    here in PyTorch.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, t_logp, ids, targets, inv_t, ignore_index, backend):
        fwd, _ = logprobs_kernels(backend)
        valid = targets != ignore_index
        anchor = torch.where(valid, ids[:, 0], targets)  # any valid id: only lse is used here
        _, _, lse, _ = fwd(hidden, weight, bias, anchor, inv_t, 0.0, ignore_index, False)
        acc = lse.dtype
        s_logp = _gather_logits(hidden, weight, bias, ids, inv_t, acc) - lse.unsqueeze(1)
        q_t = t_logp.to(acc).exp()
        q_s = s_logp.exp()
        eps = reference.TOPK_TAIL_EPS
        tail_t = (1.0 - q_t.sum(1)).clamp_min(eps)
        tail_s_raw = 1.0 - q_s.sum(1)
        tail_s = tail_s_raw.clamp_min(eps)
        kl = (q_t * (t_logp.to(acc) - s_logp)).sum(1) + tail_t * (tail_t.log() - tail_s.log())
        kl = torch.where(valid, kl.clamp_min(0.0), 0.0)
        c = torch.where(tail_s_raw > eps, tail_t / tail_s, 0.0)
        alpha = q_t.sum(1) - c * q_s.sum(1)
        sparse = c.unsqueeze(1) * q_s - q_t
        ctx.save_for_backward(hidden, weight, bias, ids, anchor, lse, alpha, sparse, valid)
        ctx.args = (inv_t, ignore_index, backend)
        if backend == "torch":
            def recompute(h, w, b):
                return (reference.linear_kl(h, w, targets, bias=b, teacher_topk=(t_logp, ids), temperature=1.0 / inv_t,
                                            ignore_index=ignore_index),)

            _autograd.record_recompute(ctx, recompute, (hidden, weight, bias), 9)
        return kl

    @staticmethod
    @_autograd.first_order_only(OP)
    def backward(ctx, grad_kl):
        hidden, weight, bias, ids, anchor, lse, alpha, sparse, valid = ctx.saved_tensors
        inv_t, ignore_index, backend = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = lse.dtype
        g = torch.where(valid, grad_kl.to(acc), 0.0)
        _, bwd = logprobs_kernels(backend)
        # Dense part: dz = g alpha (q^S - delta_anchor); the +g alpha at the anchor is sparse.
        gh, gw, gb = bwd(hidden, weight, bias, anchor, lse, lse, (-g * alpha).contiguous(), None, inv_t, 0.0, ignore_index,
                         need_h, need_w)
        s = g.unsqueeze(1) * sparse
        s[:, 0] += g * alpha
        s = s * inv_t  # chain rule of the temperature for the gathered columns
        flat_ids = ids.reshape(-1)
        if need_h:
            gh = (gh.to(acc) + torch.bmm(s.unsqueeze(1), weight[ids].to(acc)).squeeze(1)).to(hidden.dtype)
        if need_w:
            upd = (s.unsqueeze(-1) * hidden.to(acc).unsqueeze(1)).reshape(-1, hidden.shape[1])
            gw = gw.to(acc).index_add_(0, flat_ids, upd).to(weight.dtype)
        if need_b and bias is not None:
            gb = gb.to(acc).index_add_(0, flat_ids, s.reshape(-1)).to(bias.dtype)
        else:
            gb = None
        return (gh if need_h else None), (gw if need_w else None), gb, *([None] * 6)


def reduced_loss(backend, h2, w, b, th, tw, tb, tl, t1, g, inv_t, ignore_index, mode, beta):
    """(run, recompute) for GradsInForward: the reduced loss sum_i g_i kl_i, its per-token kl and
    its gradients; ``recompute`` (torch backend only) the loss by its definition."""

    def run(need_h, need_w):
        if backend == "triton":  # no Triton kernel of its own: the per-token pair back to back
            fwd, bwd = kernels(backend)
            kl, lse_s, lse_t, aux = fwd(h2, w, b, th, tw, tb, tl, t1, inv_t, ignore_index, mode, beta)
            gh, gw, gb = bwd(h2, w, b, th, tw, tb, tl, t1, lse_s, lse_t, aux, g, inv_t, ignore_index, mode, beta,
                             need_h, need_w)
        else:
            kl, gh, gw, gb = _library.impl(backend, "linear_kl_fwd_with_grads")(
                h2, w, b, th, tw, tb, tl, t1, g, inv_t, ignore_index, mode, beta, need_h, need_w)
        return torch.dot(kl, g), (gh, gw, gb), (kl,)

    def recompute(hidden, weight, bias):
        kl = reference_kl(hidden.reshape(h2.shape), weight, bias, th, tw, tb, tl, t1, inv_t, ignore_index, mode, beta)
        return torch.dot(kl, g.to(kl.dtype))

    return run, (recompute if backend == "torch" else None)
