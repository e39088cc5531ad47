"""`linear_kl`: per-token KL (or generalized JSD) between a teacher and the student, straight from
hidden states and LM heads.

Autograd and dispatch live here; the math is in `erpd/reference.py` (`linear_kl`) and
`csrc/linear_kl/math.h`, the kernels in `kernels/linear_kl.py` (Triton), `csrc/linear_kl/cpu.cpp`
(C++) and `csrc/linear_kl/kernels.cu` (CUDA epilogues).

Teacher forms:
  * fused ``(teacher_hidden, teacher_weight[, teacher_bias])`` and dense ``teacher_logits``: every
    fused backend implements one pair of functions on flattened, contiguous inputs
        fwd(hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, targets, inv_t, ignore_index,
            mode, beta) -> (kl[N], lse_s[N], lse_t[N], aux[N])             (all f32)
        bwd(..., lse_s, lse_t, aux, grad_kl[N], inv_t, ignore_index, mode, beta,
            need_grad_hidden, need_grad_weight) -> (grad_hidden, grad_weight, grad_bias)
    with mode 0 = KL(T||S), 1 = KL(S||T), 2 = JSD(beta). The backward recomputes both logits
    blocks; only O(N) statistics are kept.
    Reduced losses (``reduction="mean"|"sum"``): the gradient of sum_i g_i kl_i w.r.t. each row's
    divergence is the weight g_i, known before the forward (the targets' mask, optional
    ``token_weights``, 1/count or 1/num_items), so the gradients are computed during the forward,
    as `linear_policy_loss` does, and the autograd backward only scales them
    (`erpd/ops/_autograd.py` GradsInForward):
        cpu, cuda  fwd_with_grads(hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits,
                   targets, g[N], inv_t, ignore_index, mode, beta, need_grad_hidden,
                   need_grad_weight) -> (kl[N], grad_hidden, grad_weight, grad_bias): per row chunk
                   the student and teacher GEMMs, the divergence and dz of each row while it is in
                   cache, the dh and dW GEMMs (csrc/linear_kl/driver.h): 8·N·H·V FLOPs with a
                   fused teacher of the student's size, nothing recomputed.
        triton     the fwd and bwd kernels above, both inside the forward (12·N·H·V: the Triton
                   forward tiles do not keep the logits for the gradient).
    The per-token form (reduction None / "none") is unchanged.
  * sparse ``teacher_topk``: needs only the student's log-sum-exp and its logits at the k ids, so
    it reuses the `linear_logprobs` kernels of the chosen backend for the dense part and gathers
    the k rows of the head for the sparse part (``_TopkFunction`` below).
"""

from __future__ import annotations

import torch

from erpd import backends, reference
from erpd.ops import _library, _tp, _validate
from erpd.ops._autograd import GradsInForward, first_order_only
from erpd.ops.linear_logprobs import _impl as _logprobs_impl

OP = "linear_kl"
DIRECTIONS = reference.KL_DIRECTIONS
REDUCTIONS = ("none", "sum", "mean")
_MODE = {"forward": 0, "reverse": 1, "jsd": 2}


def _impl(backend: str):
    """(fwd, bwd) of a fused backend for the fused and dense teacher forms, as registered torch
    ops (erpd/ops/_library.py)."""
    return _library.impl(backend, "linear_kl_fwd"), _library.impl(backend, "linear_kl_bwd")


class _KLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, targets, inv_t, ignore_index, mode, beta, backend):
        fwd, _ = _impl(backend)
        kl, lse_s, lse_t, aux = fwd(hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, targets, inv_t, ignore_index, mode, beta)
        ctx.save_for_backward(hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, targets, lse_s, lse_t, aux)
        ctx.args = (inv_t, ignore_index, mode, beta, backend)
        return kl

    @staticmethod
    @first_order_only(OP)
    def backward(ctx, grad_kl):
        hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, targets, lse_s, lse_t, aux = ctx.saved_tensors
        inv_t, ignore_index, mode, beta, backend = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        _, bwd = _impl(backend)
        gh, gw, gb = bwd(
            hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, targets, lse_s, lse_t, aux,
            grad_kl.float().contiguous(), inv_t, ignore_index, mode, beta, need_h, need_w,
        )
        gb = gb.to(bias.dtype) if (need_b and bias is not None) else None
        return (gh if need_h else None), (gw if need_w else None), gb, *([None] * 10)


def _gather_logits(hidden, weight, bias, ids, inv_t, budget_bytes=64 << 20):
    """fp32 student logits at `ids` [N, k]: rows of the head gathered a chunk of tokens at a time,
    so the [rows, k, H] gather stays within a byte budget."""
    n, k = ids.shape
    h = hidden.shape[1]
    rows = max(1, min(n, budget_bytes // max(1, 4 * k * h)))
    out = torch.empty(n, k, dtype=torch.float32, device=hidden.device)
    for r0 in range(0, n, rows):
        sl = slice(r0, r0 + rows)
        w_k = weight[ids[sl]].float()  # [r, k, H]
        z = torch.bmm(w_k, hidden[sl].float().unsqueeze(-1)).squeeze(-1)
        if bias is not None:
            z += bias.float()[ids[sl]]
        out[sl] = z * inv_t
    return out


class _TopkFunction(torch.autograd.Function):
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
        fwd, _ = _logprobs_impl(backend)
        valid = targets != ignore_index
        anchor = torch.where(valid, ids[:, 0], targets)  # any valid id: only lse is used here
        _, _, lse, _ = fwd(hidden, weight, bias, anchor, inv_t, 0.0, ignore_index, False)
        s_logp = _gather_logits(hidden, weight, bias, ids, inv_t) - lse.unsqueeze(1)
        q_t = t_logp.float().exp()
        q_s = s_logp.exp()
        eps = reference.TOPK_TAIL_EPS
        tail_t = (1.0 - q_t.sum(1)).clamp_min(eps)
        tail_s_raw = 1.0 - q_s.sum(1)
        tail_s = tail_s_raw.clamp_min(eps)
        kl = (q_t * (t_logp.float() - s_logp)).sum(1) + tail_t * (tail_t.log() - tail_s.log())
        kl = torch.where(valid, kl.clamp_min(0.0), 0.0)
        c = torch.where(tail_s_raw > eps, tail_t / tail_s, 0.0)
        alpha = q_t.sum(1) - c * q_s.sum(1)
        sparse = c.unsqueeze(1) * q_s - q_t
        ctx.save_for_backward(hidden, weight, bias, ids, anchor, lse, alpha, sparse, valid)
        ctx.args = (inv_t, ignore_index, backend)
        return kl

    @staticmethod
    @first_order_only(OP)
    def backward(ctx, grad_kl):
        hidden, weight, bias, ids, anchor, lse, alpha, sparse, valid = ctx.saved_tensors
        inv_t, ignore_index, backend = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g = torch.where(valid, grad_kl.float(), 0.0)
        _, bwd = _logprobs_impl(backend)
        # Dense part: dz = g alpha (q^S - delta_anchor); the +g alpha at the anchor is sparse.
        gh, gw, gb = bwd(hidden, weight, bias, anchor, lse, lse, (-g * alpha).contiguous(), None, inv_t, 0.0, ignore_index,
                         need_h, need_w)
        s = g.unsqueeze(1) * sparse
        s[:, 0] += g * alpha
        s = s * inv_t  # chain rule of the temperature for the gathered columns
        flat_ids = ids.reshape(-1)
        if need_h:
            gh = (gh.float() + torch.bmm(s.unsqueeze(1), weight[ids].float()).squeeze(1)).to(hidden.dtype)
        if need_w:
            upd = (s.unsqueeze(-1) * hidden.float().unsqueeze(1)).reshape(-1, hidden.shape[1])
            gw = gw.float().index_add_(0, flat_ids, upd).to(weight.dtype)
        if need_b and bias is not None:
            gb = gb.float().index_add_(0, flat_ids, s.reshape(-1)).to(bias.dtype)
        else:
            gb = None
        return (gh if need_h else None), (gw if need_w else None), gb, *([None] * 6)


def _fused_loss(backend, h2, w, b, th, tw, tb, tl, t1, g, inv_t, ignore_index, mode, beta):
    """``run`` for GradsInForward: the reduced loss sum_i g_i kl_i, its per-token kl and its gradients."""

    def run(need_h, need_w):
        if backend == "triton":
            ops = torch.ops.erpd_triton
            kl, lse_s, lse_t, aux = ops.linear_kl_fwd(h2, w, b, th, tw, tb, tl, t1, inv_t, ignore_index, mode, beta)
            gh, gw, gb = ops.linear_kl_bwd(h2, w, b, th, tw, tb, tl, t1, lse_s, lse_t, aux, g, inv_t, ignore_index,
                                           mode, beta, need_h, need_w)
        else:
            kl, gh, gw, gb = torch.ops.erpd.linear_kl_fwd_with_grads(
                h2, w, b, th, tw, tb, tl, t1, g, inv_t, ignore_index, mode, beta, need_h, need_w)
        return torch.dot(kl, g), (gh, gw, gb), (kl,)

    return run


def _row_weights(valid, reduction, num_items, token_weights, dtype):
    """g_i = d(loss)/d(kl_i): 0 on ignored rows, else the token's weight (1 by default), divided by
    num_items or by the number of counted tokens for "mean" (clamped below at 1). On the device:
    no host sync."""
    g = valid.to(dtype) if token_weights is None else torch.where(valid, token_weights.to(dtype), 0.0)
    if reduction == "mean":
        n_tensor, n_value = num_items
        if n_tensor is not None:
            count = n_tensor.to(dtype)
        elif n_value:
            count = torch.tensor(n_value, dtype=dtype, device=g.device)
        else:
            count = valid.sum().to(dtype)
        g = g / count.clamp_min(1.0)
    return g


def linear_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
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
    backend: str = "auto",
    validate: bool | None = None,
    tp_group=None,
    vocab_start: int | None = None,
    reduction: str | None = None,
    num_items: float | torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Per-token divergence between a teacher's and the student's next-token distributions,
    without materializing the student's (or a fused teacher's) logits; or its sum or mean over
    the tokens, with the gradients computed during the forward.

    The student's logits are ``(hidden @ weight.T + bias) / temperature``. The teacher is one of:

    * **fused** ``teacher_hidden [..., H_t]``, ``teacher_weight [V, H_t]``, optional
      ``teacher_bias``: its logits are computed block by block next to the student's, never stored;
      ``H_t`` may differ from the student's ``H``; same dtype as the student.
    * **dense** ``teacher_logits [..., V]`` (any float dtype), divided by ``temperature`` too.
    * **top-k** ``teacher_topk = (logprobs [..., k], ids [..., k])``: the teacher's log-probs on
      its top-k ids (distinct per token), used as given. Forward KL on the k ids plus one tail
      bucket holding the rest of the mass (an exact KL of the two coarsened distributions, ≥ 0,
      0 when the student matches the teacher); ``direction`` must be ``"forward"``.

    ``direction``: ``"forward"`` KL(T‖S) (distillation's usual choice), ``"reverse"`` KL(S‖T),
    or ``"jsd"``: :math:`\beta\,\mathrm{KL}(T‖M) + (1-\beta)\,\mathrm{KL}(S‖M)`,
    :math:`M = (1-\beta)S + \beta T`, as TRL's GKD and Liger's JSD define it; ``beta`` 0 and 1
    give the forward and the reverse KL.

    Args:
        hidden, weight, bias: the student's final hidden states ``[..., H]`` and LM head.
        targets: optional ``[...]``; only a mask here: rows equal to ``ignore_index`` give 0 and
            no gradient (None: every row counts).
        backend: ``"auto" | "triton" | "cuda" | "cpu" | "torch"``.
        validate: force/skip the value checks (targets and top-k ids in range); by default they
            run on CPU tensors and on CUDA only with ``ERPD_CHECK_INPUTS=1``.
        tp_group: vocabulary sharding as in :func:`erpd.linear_logprobs`: ``weight``/``bias`` and
            the fused teacher's ``teacher_weight``/``teacher_bias`` are this rank's rows of the
            vocabulary, or ``teacher_logits`` is ``[..., V_r]``, sliced to the same rows;
            ``teacher_topk`` is not supported. ``vocab_start`` is only checked (the divergence
            does not depend on the shard's position).
        reduction: ``None`` or ``"none"``: the per-token divergences. ``"sum"``:
            :math:`\sum_i w_i\,\mathrm{kl}_i` over the tokens that count (targets != ignore_index),
            :math:`w_i` = ``token_weights`` (default 1). ``"mean"``: that sum divided by
            ``num_items`` if given, else by the number of tokens that count (clamped below at 1; an
            all-ignored batch gives 0). With a fused or dense teacher the fused backends compute
            the gradients in the forward (8·N·H·V FLOPs with a fused teacher of the student's size
            instead of 12·N·H·V, no pass over the vocabulary in the backward, which only scales
            them; a second backward through the same call is an error). With ``teacher_topk`` or
            ``tp_group`` the per-token op is reduced through autograd.
        num_items: ``"mean"`` only: the token count of the whole optimizer step (all
            gradient-accumulation micro-batches, all ranks), so that the micro-batches' losses
            and gradients sum to the full batch's; a number > 0 or a one-element tensor (read on
            the device, no host sync).
        token_weights: ``[...]`` float, per-token multipliers of the reduced loss (no gradient),
            e.g. a trust-region keep mask or 1/length for a per-sequence mean; finite and ≥ 0
            where targets != ignore_index.

    Returns:
        ``kl [...]`` float32 (float64 for float64 inputs on ``backend="torch"``), ≥ 0; with a
        reduction, the scalar loss (same dtype). Differentiable w.r.t. ``hidden``, ``weight`` and
        ``bias``; the teacher gets no gradient.
    """
    hidden, weight, bias = _validate.linear_head(hidden, weight, bias)
    temperature = _validate.temperature(temperature)
    ignore_index = _validate.index(ignore_index, "ignore_index")
    direction = _validate.choice(direction, "direction", DIRECTIONS)
    beta = _validate.probability(beta, "beta")
    check_values = _validate.want_value_checks(hidden.device, validate)
    form, teacher = _validate.kl_teacher(
        hidden, weight, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, teacher_topk, check_values
    )
    if direction == "jsd" and beta in (0.0, 1.0):
        direction = "forward" if beta == 0.0 else "reverse"
    reduction = _validate.choice("none" if reduction is None else reduction, "reduction", REDUCTIONS)
    if reduction == "none" and (num_items is not None or token_weights is not None):
        raise ValueError("num_items and token_weights weight a reduced loss: give reduction='mean' or 'sum'")
    if reduction == "sum" and num_items is not None:
        raise ValueError("num_items replaces the token count of reduction='mean'; reduction='sum' divides by nothing")
    if form == "topk" and direction != "forward":
        raise ValueError(f"teacher_topk supports direction='forward' only (got {direction!r}): the reverse KL and the JSD need the teacher's full distribution")
    if targets is None:
        targets = torch.zeros(hidden.shape[:-1], dtype=torch.long, device=hidden.device)
        ignore_index = -1
    else:
        # (With tp_group the ids index the whole vocabulary, not this rank's shard: no range check.)
        targets = _validate.targets(targets, hidden, weight.shape[0], ignore_index, check_values and tp_group is None)
    if reduction != "none":
        valid = targets != ignore_index
        token_weights = _validate.token_weights(token_weights, valid, check_values)
        g = _row_weights(valid, reduction, _validate.num_items(num_items, hidden.device, check_values), token_weights,
                         torch.float64 if hidden.dtype == torch.float64 else torch.float32)

        def reduce(kl):  # the per-token forms, reduced through autograd
            return (kl.reshape(g.shape) * g.to(kl.dtype)).sum()
    else:
        reduce = None
    if tp_group is not None:
        kl = _tp.linear_kl(
            hidden, weight, bias, targets, form, teacher, mode=_MODE[direction], beta=beta, temperature=temperature,
            ignore_index=ignore_index, backend=backend, tp_group=tp_group, vocab_start=vocab_start,
        )
        return kl if reduce is None else reduce(kl)
    name = backends.resolve(backend, hidden.device, "linear_logprobs" if form == "topk" else OP)

    if name == "torch":
        kw = dict(fused=dict(zip(("teacher_hidden", "teacher_weight", "teacher_bias"), teacher)),
                  dense=dict(teacher_logits=teacher[0]), topk=dict(teacher_topk=teacher))[form]
        kl = reference.linear_kl(hidden, weight, targets, bias=bias, direction=direction, beta=beta,
                                 temperature=temperature, ignore_index=ignore_index, **kw)
        return kl if reduce is None else reduce(kl)
    if hidden.dtype == torch.float64:
        raise TypeError(f"backend={name!r} supports fp32/bf16/fp16 inputs; float64 runs only on backend='torch'")

    lead, v = hidden.shape[:-1], weight.shape[0]
    flat = lambda x, d: None if x is None else x.reshape(-1, d).contiguous()  # noqa: E731
    h2 = flat(hidden, hidden.shape[-1])
    t1 = targets.reshape(-1).contiguous()
    if h2.shape[0] == 0:
        # Keep the graph connected so that .backward() on an empty batch gives zero grads.
        kl = (h2.sum(-1) + weight.sum() * 0).float().reshape(lead)
        return kl if reduce is None else reduce(kl)
    w, b = weight.contiguous(), (None if bias is None else bias.contiguous())
    inv_t = 1.0 / temperature
    if form == "topk":
        t_logp, ids = teacher
        k = ids.shape[-1]
        kl = _TopkFunction.apply(h2, w, b, flat(t_logp.detach(), k), flat(ids, k), t1, inv_t, ignore_index, name)
        return kl.reshape(lead) if reduce is None else reduce(kl)
    if form == "fused":
        th, tw, tb = teacher
        th, tw, tb, tl = flat(th.detach(), th.shape[-1]), tw.detach().contiguous(), (None if tb is None else tb.detach().contiguous()), None
    else:
        th = tw = tb = None
        tl = flat(teacher[0].detach(), v)
    if reduce is not None:
        run = _fused_loss(name, h2, w, b, th, tw, tb, tl, t1, g.reshape(-1).contiguous(), inv_t, ignore_index,
                          _MODE[direction], beta)
        loss, _ = GradsInForward.apply(hidden, weight, bias, run, OP)
        return loss
    kl = _KLFunction.apply(h2, w, b, th, tw, tb, tl, t1, inv_t, ignore_index, _MODE[direction], beta, name)
    return kl.reshape(lead)
