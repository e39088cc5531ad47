"""The public `linear_policy_loss`: argument checks, the options, the backend and its run
(erpd/ops/linear_policy_loss/function.py), or the vocabulary-parallel form (tp.py)."""

from __future__ import annotations

import torch

from erpd import backends, reference
from erpd.ops import _validate
from erpd.ops._autograd import GradsInForward
from erpd.ops.linear_policy_loss import tp
from erpd.ops.linear_policy_loss.function import OP, recompute, run_composed, run_fused
from erpd.ops.options import PolicyOptions, with_option_parameters
from erpd.ops.policy_loss.function import metrics_from_stats
from erpd.ops.policy_loss.torch_kernels import reference_num_items


@with_option_parameters
def linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    options: PolicyOptions | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    is_weights: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    num_items: float | torch.Tensor | None = None,
    backend: str = "auto",
    validate: bool | None = None,
    tp_group=None,
    vocab_start: int | None = None,
    return_logprobs: bool = False,
    **option_kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Policy loss straight from hidden states and the LM head, gradients computed in the forward.

    Equals ``erpd.policy_loss(logprobs, old_logprobs, advantages, mask', entropy=entropy, ...)``
    with ``logprobs, entropy = erpd.linear_logprobs(hidden, weight, targets, bias=bias,
    temperature=temperature, ignore_index=ignore_index, with_entropy=True)`` and
    ``mask' = mask & (targets != ignore_index)``, without materializing the logits and without a
    second pass over the vocabulary in the backward.

    Args:
        hidden: ``[B, T, H]`` final hidden states of the completion tokens.
        weight: ``[V, H]`` LM head (``bias``: optional ``[V]``); same dtype as ``hidden``, or fp32
            with fp16/bf16 ``hidden`` (as :func:`erpd.linear_logprobs`).
        temperature, logit_scale, softcap: the logits, as in :func:`erpd.linear_logprobs`.
        targets: ``[B, T]`` the sampled token ids (``ignore_index`` entries are masked out).
        old_logprobs: ``[B, T]``, or None for on-policy (the ratio is exp(x - sg(x)) = 1 with
            the policy gradient, as TRL does when it does not reuse a batch).
        advantages, mask, options, is_weights, ref_logprobs, num_items, backend, validate: as in
            :func:`erpd.policy_loss` (the options' fields may be given as keyword arguments);
            the entropy is computed here (it is always in the metrics), ``entropy_coef`` adds
            the bonus.
        tp_group, vocab_start: vocabulary sharding as in :func:`erpd.linear_logprobs`. The
            vocab-parallel log-probs and entropy (identical on every rank) go through
            :func:`erpd.policy_loss`, whose gradient flows back through them (a backward pass
            over the shard, instead of the gradients computed in the forward).

        return_logprobs: also put the per-token log-probs the op computed on the way into
            ``metrics["logprobs"]`` (``[B, T]`` float32, detached, 0 at ignored targets): what a
            trainer logs (the log-ratio to the old policy, ...) without a second pass.

    Returns:
        ``(loss, metrics)`` as :func:`erpd.policy_loss` (``entropy`` always among the metrics).
        Differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    hidden, weight, bias = _validate.linear_head(hidden, weight, bias)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape [B, T, H], got {list(hidden.shape)}")
    inv_t, cap = _validate.logit_transform(temperature, logit_scale, softcap)
    ignore_index = _validate.index(ignore_index, "ignore_index")
    options = PolicyOptions.of(options, "erpd.linear_policy_loss", **option_kwargs)
    if tp_group is not None:
        if softcap is not None:
            raise NotImplementedError("softcap with tp_group is not supported (logit_scale is)")
        loss, metrics, lp = tp.linear_policy_loss(
            hidden, weight, bias, targets, old_logprobs, advantages, mask, options, temperature=1.0 / inv_t,
            ignore_index=ignore_index, backend=backend, validate=validate, tp_group=tp_group, vocab_start=vocab_start,
            is_weights=is_weights, ref_logprobs=ref_logprobs, num_items=num_items,
        )
        return loss, _with_logprobs(metrics, lp, return_logprobs)
    dev = hidden.device
    check_values = _validate.want_value_checks(dev, validate)
    targets = _validate.targets(targets, hidden, weight.shape[0], ignore_index, check_values)
    B, T = targets.shape
    old_logprobs, advantages, mask, ref_logprobs, _, is_weights = _validate.policy_tensors(
        (B, T), dev, old_logprobs, advantages, mask, ref_logprobs, None, is_weights, check_values, old_optional=True,
    )
    opts = _validate.check_policy(options, has_ref=ref_logprobs is not None, has_entropy=None)
    n_tensor, n_value = _validate.num_items(num_items, dev, check_values)
    name = backends.resolve(backend, dev, OP)
    valid = (mask != 0) & (targets != ignore_index)

    if B * T == 0:
        # An empty batch: nothing to fuse; the definition gives its zero loss and metrics.
        lp, ent = reference.linear_logprobs(
            hidden, weight, targets, bias=bias, temperature=temperature, ignore_index=ignore_index, with_entropy=True,
            logit_scale=logit_scale, softcap=softcap,
        )
        loss, metrics = reference.policy_loss(
            lp, lp.detach() if old_logprobs is None else old_logprobs, advantages, valid,
            is_weights=is_weights, ref_logprobs=ref_logprobs, entropy=ent,
            num_items=num_items if n_tensor is None else n_tensor, options=opts.options(),
        )
        return loss, _with_logprobs(metrics, lp, return_logprobs)
    if hidden.dtype == torch.float64 and name != "torch":
        raise TypeError(f"backend={name!r} supports fp32/bf16/fp16 inputs; float64 runs only on backend='torch'")

    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    cast = lambda t: None if t is None else t.detach().to(acc).contiguous()  # noqa: E731
    t1 = targets.reshape(-1).contiguous()
    old, adv, ref, isw = cast(old_logprobs), cast(advantages), cast(ref_logprobs), cast(is_weights)
    make = run_fused if name in ("cpu", "cuda") else run_composed
    run = make(
        name, hidden.reshape(B * T, hidden.shape[-1]).contiguous(), weight.contiguous(),
        None if bias is None else bias.contiguous(), t1, inv_t, cap, ignore_index, old, adv, valid.contiguous(), ref,
        isw, n_tensor, opts.kernel_args(T, n_value),
    )
    again = None
    if name == "torch":
        again = recompute(t1, inv_t, cap, ignore_index, old, adv, valid, ref, isw,
                          reference_num_items(n_tensor, n_value), opts.options())
    loss, stats, lp = GradsInForward.apply(hidden, weight, bias, run, OP, again)
    return loss, _with_logprobs(metrics_from_stats(stats, ref_logprobs is not None, True), lp.view(B, T), return_logprobs)


def _with_logprobs(metrics: dict, logprobs: torch.Tensor, wanted: bool) -> dict:
    if wanted:
        metrics["logprobs"] = logprobs.detach().to(torch.float32)
    return metrics
