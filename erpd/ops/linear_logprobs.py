"""`linear_logprobs`: per-token log-probs (and entropy) straight from hidden states and the LM head.

Autograd and dispatch live here; the math is in `erpd/reference.py`, the kernels in
`kernels/linear_logprobs.py` (Triton), `csrc/linear_logprobs/cpu.cpp` (C++) and
`csrc/linear_logprobs/kernels.cu` (CUDA epilogues).

Every fused backend implements the same pair of functions on flattened, contiguous inputs:

    fwd(hidden[N,H], weight[V,H], bias[V]|None, targets[N] int64, inv_temperature, softcap_scale,
        ignore_index, with_stats)
        -> (logprobs[N] f32, entropy[N] f32, lse[N] f32, stats[3,N] f32 | empty)
    bwd(hidden, weight, bias, targets, lse, entropy, grad_logprobs[N] f32, grad_entropy[N] f32|None,
        inv_temperature, softcap_scale, ignore_index, need_grad_hidden, need_grad_weight)
        -> (grad_hidden[N,H] hidden.dtype | empty, grad_weight[V,H] weight.dtype | empty,
            grad_bias[V] f32 | empty)

with the logits ``y * inv_temperature``, or ``tanh(softcap_scale * y) * inv_temperature`` when
softcap_scale > 0 (``_validate.logit_transform`` maps temperature, logit scale and softcap onto
the two), y = hidden @ weight.T + bias; `stats` (log sum p^2, the mean logit, is_top1 as 0/1)
only with `with_stats`. The forward keeps only O(N) statistics (lse, entropy); the backward
recomputes the logits block by block, so no backend ever holds the [N, V] logits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from erpd import backends, reference
from erpd.ops import _library, _tp, _validate
from erpd.ops._autograd import first_order_only

OP = "linear_logprobs"


def _impl(backend: str):
    """(fwd, bwd) of a fused backend, as registered torch ops (erpd/ops/_library.py)."""
    return _library.impl(backend, "linear_logprobs_fwd"), _library.impl(backend, "linear_logprobs_bwd")


class _LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temperature, softcap_scale, ignore_index, with_stats, backend):
        fwd, _ = _impl(backend)
        logp, entropy, lse, stats = fwd(hidden, weight, bias, targets, inv_temperature, softcap_scale, ignore_index,
                                        with_stats)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.args = (inv_temperature, softcap_scale, ignore_index)
        ctx.backend = backend
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)
        return logp, entropy, stats

    @staticmethod
    @first_order_only(OP)
    def backward(ctx, grad_logp, grad_entropy, _grad_stats):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_logp is None and grad_entropy is None:
            return (None,) * 9
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        _, bwd = _impl(ctx.backend)
        gh, gw, gb = bwd(
            hidden, weight, bias, targets, lse, entropy,
            grad_logp.float().contiguous(),
            None if grad_entropy is None else grad_entropy.float().contiguous(),
            *ctx.args, need_h, need_w,
        )
        gb = gb.to(bias.dtype) if (need_b and bias is not None) else None
        return (gh if need_h else None), (gw if need_w else None), gb, *([None] * 6)


class TokenStats(NamedTuple):
    """The per-token fields of :func:`linear_token_stats` (those of TRL's ``FusedCausalLMOutput``)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor
    log_sum_sq_probs: torch.Tensor
    mean_logits: torch.Tensor
    is_top1: torch.Tensor


def _fused(hidden, weight, bias, targets, temperature, logit_scale, softcap, ignore_index, backend, validate,
           with_entropy, with_stats):
    """Checks the arguments and runs one fused forward: (logprobs, entropy, stats [3, ...] | None), or
    the reference's outputs on backend='torch' (stats then a dict)."""
    hidden, weight, bias = _validate.linear_head(hidden, weight, bias)
    inv_t, cap_scale = _validate.logit_transform(temperature, logit_scale, softcap)
    ignore_index = _validate.index(ignore_index, "ignore_index")
    check_values = _validate.want_value_checks(hidden.device, validate)
    targets = _validate.targets(targets, hidden, weight.shape[0], ignore_index, check_values)
    name = backends.resolve(backend, hidden.device, OP)
    kw = dict(bias=bias, temperature=temperature, ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap)
    if name == "torch":
        if with_stats:
            out = reference.linear_token_stats(hidden, weight, targets, **kw)
            return out["logprobs"], out["entropy"], out
        return (*reference.linear_logprobs(hidden, weight, targets, with_entropy=with_entropy, **kw), None)
    if hidden.dtype == torch.float64:
        raise TypeError(f"backend={name!r} supports fp32/bf16/fp16 inputs; float64 runs only on backend='torch'")

    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    t1 = targets.reshape(-1).contiguous()
    if h2.shape[0] == 0:
        # Keep the graph connected so that .backward() on an empty batch gives zero grads.
        empty = (h2.sum(-1) + weight.sum() * 0).float().reshape(lead)
        return empty, empty, (h2.new_zeros((3, *lead), dtype=torch.float32) if with_stats else None)
    logp, entropy, stats = _LinearLogprobsFunction.apply(
        h2, weight.contiguous(), None if bias is None else bias.contiguous(), t1, inv_t, cap_scale, ignore_index,
        with_stats, name,
    )
    return logp.reshape(lead), entropy.reshape(lead), (stats.reshape(3, *lead) if with_stats else None)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    with_entropy: bool = False,
    backend: str = "auto",
    validate: bool | None = None,
    tp_group=None,
    vocab_start: int | None = None,
    reduce_grad_hidden: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Log-probability of each target token, and optionally the entropy, without materializing logits.

    Computes, for every token, ``logits = (hidden @ weight.T + bias) / temperature`` one vocabulary
    block at a time and returns ``log_softmax(logits)[target]`` and ``-sum(p * log p)``.

    Args:
        hidden: ``[..., H]`` final hidden states (fp32, bf16 or fp16; fp64 with ``backend="torch"``).
        weight: ``[V, H]`` LM-head weight, same dtype and device as ``hidden``, or fp32 with
            fp16/bf16 ``hidden`` (a mixed-precision master weight: computed as autocast computes
            ``F.linear``, i.e. with the weight cast to ``hidden``'s dtype; its gradient comes back
            in fp32). Under ``torch.autocast`` every op runs in the autocast dtype, as ``F.linear``.
        targets: ``[...]`` integer token ids in ``[0, V)``, or ``ignore_index``.
        bias: optional ``[V]`` LM-head bias.
        temperature: logits are divided by it (> 0), as samplers do.
        logit_scale: the logits ``hidden @ weight.T + bias`` are multiplied by it first (> 0):
            Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``, Falcon-H1's
            ``lm_head_multiplier``.
        softcap: None, or Gemma's ``final_logit_softcapping`` c > 0: the scaled logits x become
            ``c * tanh(x / c)`` before the temperature (not with ``tp_group``).
        ignore_index: rows with this target give 0 for both outputs and get zero gradient.
        with_entropy: also return the per-token entropy (differentiable).
        backend: ``"auto" | "triton" | "cuda" | "cpu" | "torch"`` (see ``erpd.backends``).
        validate: force (True) or skip (False) the value checks on ``targets``; by default they
            run on CPU tensors and, on CUDA, only when ``ERPD_CHECK_INPUTS=1`` (they need a sync).
        tp_group: a ``torch.distributed`` process group over which the vocabulary is sharded
            (tensor parallelism): ``weight``/``bias`` are this rank's contiguous rows
            ``[vocab_start, vocab_start + V_r)`` of the full head (shards may be uneven),
            ``hidden``/``targets`` are the same on every rank and hold global token ids. The
            outputs are the full-vocabulary values, identical on every rank; the gradient w.r.t.
            ``hidden`` is all-reduced, the shard's ``weight``/``bias`` gradients stay local.
            Needs a fused backend. See ``erpd/ops/_tp.py`` and the README for the communication.
        vocab_start: this rank's first vocabulary id; None computes it with an all-gather of the
            shard sizes on every call (pass it to avoid that collective).
        reduce_grad_hidden: with ``tp_group``, whether the backward all-reduces the gradient
            w.r.t. ``hidden`` over the group (True), or returns each rank's partial sum for the
            caller to reduce (False: a framework whose sequence-parallel region reduces it, as
            Megatron's reduce-scatter does).

    Returns:
        ``(logprobs, entropy)``: float32 tensors of shape ``[...]`` (float64 for float64 inputs);
        ``entropy`` is None unless ``with_entropy``.

    Differentiable w.r.t. ``hidden``, ``weight`` and ``bias``. All backends accumulate in float32.
    NaN or inf in a row of ``hidden`` makes that row's outputs NaN and leaves other rows' outputs
    unaffected; NaN in ``weight`` or ``bias`` reaches every non-ignored row (each row's
    normaliser sums over the whole vocabulary). Gradients w.r.t. ``weight`` sum over rows, so a
    NaN row reaches them too.
    """
    if tp_group is not None:
        if softcap is not None:
            raise NotImplementedError("softcap with tp_group is not supported (logit_scale is)")
        hidden, weight, bias = _validate.linear_head(hidden, weight, bias)
        inv_t, _ = _validate.logit_transform(temperature, logit_scale, softcap)
        ignore_index = _validate.index(ignore_index, "ignore_index")
        return _tp.linear_logprobs(
            hidden, weight, bias, targets, temperature=1.0 / inv_t, ignore_index=ignore_index,
            with_entropy=with_entropy, backend=backend, check_values=_validate.want_value_checks(hidden.device, validate),
            tp_group=tp_group, vocab_start=vocab_start, reduce_grad_hidden=reduce_grad_hidden,
        )
    logp, entropy, _ = _fused(hidden, weight, bias, targets, temperature, logit_scale, softcap, ignore_index, backend,
                              validate, with_entropy=with_entropy, with_stats=False)
    return logp, (entropy if with_entropy else None)


def linear_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    validate: bool | None = None,
) -> TokenStats:
    r"""Every per-token field of TRL's fused LM head in one fused pass over the vocabulary.

    Arguments as :func:`linear_logprobs`. Returns a :class:`TokenStats`: ``logprobs`` and
    ``entropy`` (float32, differentiable, as :func:`linear_logprobs`), and, without gradient,
    ``log_sum_sq_probs`` (:math:`\log\sum_k p_k^2`, float32), ``mean_logits`` (the mean over the
    vocabulary of the logits after scale, softcap and temperature, float32) and ``is_top1`` (bool:
    the target is the first maximal logit, ``argmax``'s rule). The three extra fields cost a few
    operations per logit in the same pass (the C++/CUDA drivers reduce each chunk of logits once
    more before reusing it), no extra matrix product. Rows whose target is ``ignore_index`` give
    0 / False. Not with ``tp_group``.
    """
    logp, entropy, stats = _fused(hidden, weight, bias, targets, temperature, logit_scale, softcap, ignore_index,
                                  backend, validate, with_entropy=True, with_stats=True)
    if isinstance(stats, dict):  # backend="torch": the reference's fields
        return TokenStats(**stats)
    return TokenStats(logp, entropy, stats[0], stats[1], stats[2] != 0)
