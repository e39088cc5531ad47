"""`linear_logprobs`: per-token log-probs (and entropy) straight from hidden states and the LM head.

Autograd and dispatch live here; the math is in `erpd/reference.py`, the kernels in
`kernels/linear_logprobs.py` (Triton), `csrc/cpu/linear_logprobs.cpp` (C++) and
`csrc/linear_logprobs.cu` (CUDA epilogues).

Every fused backend implements the same pair of functions on flattened, contiguous inputs:

    fwd(hidden[N,H], weight[V,H], bias[V]|None, targets[N] int64, inv_temperature, ignore_index)
        -> (logprobs[N] f32, entropy[N] f32, lse[N] f32)
    bwd(hidden, weight, bias, targets, lse, entropy, grad_logprobs[N] f32, grad_entropy[N] f32|None,
        inv_temperature, ignore_index, need_grad_hidden, need_grad_weight)
        -> (grad_hidden[N,H] hidden.dtype | empty, grad_weight[V,H] weight.dtype | empty,
            grad_bias[V] f32 | empty)

The forward keeps only O(N) statistics (lse, entropy); the backward recomputes the logits block
by block, so no backend ever holds the [N, V] logits.
"""

from __future__ import annotations

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
    def forward(ctx, hidden, weight, bias, targets, inv_temperature, ignore_index, backend):
        fwd, _ = _impl(backend)
        logp, entropy, lse = fwd(hidden, weight, bias, targets, inv_temperature, ignore_index)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.inv_temperature, ctx.ignore_index, ctx.backend = inv_temperature, ignore_index, backend
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    @first_order_only(OP)
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_logp is None and grad_entropy is None:
            return (None,) * 7
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        _, bwd = _impl(ctx.backend)
        gh, gw, gb = bwd(
            hidden, weight, bias, targets, lse, entropy,
            grad_logp.float().contiguous(),
            None if grad_entropy is None else grad_entropy.float().contiguous(),
            ctx.inv_temperature, ctx.ignore_index, need_h, need_w,
        )
        gb = gb.to(bias.dtype) if (need_b and bias is not None) else None
        return (gh if need_h else None), (gw if need_w else None), gb, None, None, None, None


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
    backend: str = "auto",
    validate: bool | None = None,
    tp_group=None,
    vocab_start: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Log-probability of each target token, and optionally the entropy, without materializing logits.

    Computes, for every token, ``logits = (hidden @ weight.T + bias) / temperature`` one vocabulary
    block at a time and returns ``log_softmax(logits)[target]`` and ``-sum(p * log p)``.

    Args:
        hidden: ``[..., H]`` final hidden states (fp32, bf16 or fp16; fp64 with ``backend="torch"``).
        weight: ``[V, H]`` LM-head weight, same dtype and device as ``hidden``.
        targets: ``[...]`` integer token ids in ``[0, V)``, or ``ignore_index``.
        bias: optional ``[V]`` LM-head bias.
        temperature: logits are divided by it (> 0), as samplers do.
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

    Returns:
        ``(logprobs, entropy)``: float32 tensors of shape ``[...]`` (float64 for float64 inputs);
        ``entropy`` is None unless ``with_entropy``.

    Differentiable w.r.t. ``hidden``, ``weight`` and ``bias``. All backends accumulate in float32.
    NaN or inf in a row of ``hidden`` makes that row's outputs NaN and leaves other rows' outputs
    unaffected; NaN in ``weight`` or ``bias`` reaches every non-ignored row (each row's
    normaliser sums over the whole vocabulary). Gradients w.r.t. ``weight`` sum over rows, so a
    NaN row reaches them too.
    """
    hidden, weight, bias = _validate.linear_head(hidden, weight, bias)
    inv_t = 1.0 / _validate.temperature(temperature)
    ignore_index = _validate.index(ignore_index, "ignore_index")
    check_values = _validate.want_value_checks(hidden.device, validate)
    if tp_group is not None:
        return _tp.linear_logprobs(
            hidden, weight, bias, targets, temperature=temperature, ignore_index=ignore_index, with_entropy=with_entropy,
            backend=backend, check_values=check_values, tp_group=tp_group, vocab_start=vocab_start,
        )
    targets = _validate.targets(targets, hidden, weight.shape[0], ignore_index, check_values)
    name = backends.resolve(backend, hidden.device, OP)

    if name == "torch":
        logp, entropy = reference.linear_logprobs(
            hidden, weight, targets, bias=bias, temperature=temperature,
            ignore_index=ignore_index, with_entropy=with_entropy,
        )
        return logp, entropy
    if hidden.dtype == torch.float64:
        raise TypeError(f"backend={name!r} supports fp32/bf16/fp16 inputs; float64 runs only on backend='torch'")

    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    t1 = targets.reshape(-1).contiguous()
    if h2.shape[0] == 0:
        # Keep the graph connected so that .backward() on an empty batch gives zero grads.
        empty = (h2.sum(-1) + weight.sum() * 0).float()
        return empty.reshape(lead), (empty.reshape(lead) if with_entropy else None)
    logp, entropy = _LinearLogprobsFunction.apply(
        h2, weight.contiguous(), None if bias is None else bias.contiguous(), t1, inv_t, ignore_index, name
    )
    return logp.reshape(lead), (entropy.reshape(lead) if with_entropy else None)
