"""The public `linear_kl`: argument checks, the backend, flattening, and the choice of Function
(erpd/ops/linear_kl/function.py) or of the vocabulary-parallel form (tp.py)."""

from __future__ import annotations

import torch

from erpd import backends
from erpd.ops import _torch, _validate
from erpd.ops._autograd import GradsInForward
from erpd.ops.linear_kl import tp
from erpd.ops.linear_kl.function import DIRECTIONS, MODES, OP, KLFunction, TopkFunction, reduced_loss

REDUCTIONS = ("none", "sum", "mean")


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
        kl = tp.linear_kl(
            hidden, weight, bias, targets, form, teacher, mode=MODES[direction], beta=beta, temperature=temperature,
            ignore_index=ignore_index, backend=backend, tp_group=tp_group, vocab_start=vocab_start,
        )
        return kl if reduce is None else reduce(kl)
    name = backends.resolve(backend, hidden.device, "linear_logprobs" if form == "topk" else OP)
    if hidden.dtype == torch.float64 and name != "torch":
        raise TypeError(f"backend={name!r} supports fp32/bf16/fp16 inputs; float64 runs only on backend='torch'")

    lead, v = hidden.shape[:-1], weight.shape[0]
    flat = lambda x, d: None if x is None else x.reshape(-1, d).contiguous()  # noqa: E731
    h2 = flat(hidden, hidden.shape[-1])
    t1 = targets.reshape(-1).contiguous()
    if h2.shape[0] == 0:
        # Keep the graph connected so that .backward() on an empty batch gives zero grads.
        kl = (h2.sum(-1) + weight.sum() * 0).to(_torch.acc_dtype(hidden)).reshape(lead)
        return kl if reduce is None else reduce(kl)
    w, b = weight.contiguous(), (None if bias is None else bias.contiguous())
    inv_t = 1.0 / temperature
    if form == "topk":
        t_logp, ids = teacher
        k = ids.shape[-1]
        kl = TopkFunction.apply(h2, w, b, flat(t_logp.detach(), k), flat(ids, k), t1, inv_t, ignore_index, name)
        return kl.reshape(lead) if reduce is None else reduce(kl)
    if form == "fused":
        th, tw, tb = teacher
        th, tw, tb, tl = flat(th.detach(), th.shape[-1]), tw.detach().contiguous(), (None if tb is None else tb.detach().contiguous()), None
    else:
        th = tw = tb = None
        tl = flat(teacher[0].detach(), v)
    if reduce is not None:
        run, recompute = reduced_loss(name, h2, w, b, th, tw, tb, tl, t1, g.reshape(-1).contiguous(), inv_t,
                                      ignore_index, MODES[direction], beta)
        loss, _ = GradsInForward.apply(hidden, weight, bias, run, OP, recompute)
        return loss
    kl = KLFunction.apply(h2, w, b, th, tw, tb, tl, t1, inv_t, ignore_index, MODES[direction], beta, name)
    return kl.reshape(lead)
