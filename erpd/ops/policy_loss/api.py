"""The public `policy_loss`: argument checks, the backend and the Function
(erpd/ops/policy_loss/function.py)."""

from __future__ import annotations

import torch

from erpd import backends
from erpd.ops import _validate
from erpd.ops.options import PolicyOptions, with_option_parameters
from erpd.ops.policy_loss.function import OP, PolicyLossFunction, metrics_from_stats


def _as(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """`dtype`, contiguous (the common case passes through without a call into torch)."""
    if t is None or (t.dtype == dtype and t.is_contiguous()):
        return t
    return t.to(dtype).contiguous()


@with_option_parameters
def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    options: PolicyOptions | None = None,
    is_weights: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    num_items: float | torch.Tensor | None = None,
    backend: str = "auto",
    validate: bool | None = None,
    **option_kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Policy-gradient loss of per-token log-probs against an old policy; returns ``(loss, metrics)``.

    The loss and its options are defined in :func:`erpd.reference.policy_loss` (formulas there):
    ``L = sum_bt w_bt [rho_bt l_bt + kl_coef k_bt - entropy_coef H_bt]`` with the per-token
    ``method`` loss ``l``, aggregation weights ``w`` from ``agg`` / ``num_items`` /
    ``norm_length`` (:func:`erpd.reference.policy_agg_weights`), ``is_weights`` ``rho``.

    Args:
        logprobs: ``[B, T]`` log-probs of the sampled tokens under the current policy
            (differentiable; fp32, bf16 or fp16; fp64 with ``backend="torch"``).
        old_logprobs: ``[B, T]`` log-probs under the policy that the ratio is taken against
            (detached; ``logprobs.detach()`` for on-policy).
        advantages: ``[B]`` (one per sequence, GRPO) or ``[B, T]``.
        mask: ``[B, T]`` 0/1 (bool, integer or float); 0 = padding: no loss, no gradient.
        options: a :class:`erpd.PolicyOptions` (``method``, ``agg``, the clip bounds, ``kl_coef``,
            ``entropy_coef``, ...); its fields may also be given as keyword arguments, which
            override it.
        is_weights: ``[B, T]`` detached per-token weights of the policy term (rollout correction).
        ref_logprobs: ``[B, T]`` log-probs of the reference policy, for the KL penalty
            (``kl_coef``, ``kl_estimator``) or, without ``kl_coef``, the ``kl_ref`` metric.
        entropy: ``[B, T]`` entropy (differentiable), for the bonus (``entropy_coef``) and the
            ``entropy`` metric.
        num_items: the count of the whole optimizer step that the aggregation divides by
            (tokens for token-mean, sequences for seq-mean-*), so that gradient-accumulation
            micro-batches add up to the full-batch gradient; a number or a one-element tensor
            (read on device, no sync). It must be finite and > 0 (checked for a tensor where the
            value checks run); unchecked, a tensor below 1 counts as 1 and a NaN or infinite one
            makes the loss and gradients NaN, on every backend.
        backend: ``"auto" | "triton" | "cuda" | "cpu" | "torch"`` (see ``erpd.backends``).
        validate: force (True) or skip (False) the value checks (mask is 0/1, no NaN in
            advantages / old / ref log-probs / is_weights at valid positions); by default they
            run on CPU tensors, and on CUDA only when ``ERPD_CHECK_INPUTS=1``.

    Returns:
        ``loss``: float32 0-dim tensor (float64 for float64 inputs on ``backend="torch"``);
        ``metrics``: dict of detached 0-dim tensors, ``pg_loss``, ``clipfrac_low``,
        ``clipfrac_high``, ``clipfrac``, ``ratio_mean``, ``ratio_min``, ``ratio_max``,
        ``approx_kl``, ``num_valid`` (the valid-token count the means are over), and ``kl_ref`` /
        ``entropy`` when those inputs are given.
    """
    logprobs = _validate.tensor(logprobs, "logprobs")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must have shape [B, T], got {list(logprobs.shape)}")
    if logprobs.dtype not in _validate.FLOAT_DTYPES:
        raise TypeError(f"logprobs must be a floating tensor, got {logprobs.dtype}")
    dev = logprobs.device
    check_values = _validate.want_value_checks(dev, validate)
    old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights = _validate.policy_tensors(
        tuple(logprobs.shape), dev, old_logprobs, advantages, mask, ref_logprobs, entropy, is_weights, check_values,
    )
    options = PolicyOptions.of(options, "erpd.policy_loss", **option_kwargs)
    opts = _validate.check_policy(options, has_ref=ref_logprobs is not None, has_entropy=entropy is not None)
    n_tensor, n_value = _validate.num_items(num_items, dev, check_values)
    name = backends.resolve(backend, dev, OP)
    if logprobs.dtype == torch.float64 and name != "torch":
        raise TypeError(f"backend={name!r} supports fp32/bf16/fp16 inputs; float64 runs only on backend='torch'")

    # The kernels take float32 (float64 on the torch backend); autograd casts the gradients back.
    acc = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    lp, ent = _as(logprobs, acc), _as(entropy, acc)
    m = mask if mask.dtype == torch.bool else mask != 0
    loss, stats = PolicyLossFunction.apply(
        lp, ent, _as(old_logprobs, acc), _as(advantages, acc), m.contiguous(), _as(ref_logprobs, acc), _as(is_weights, acc),
        n_tensor, opts.kernel_args(logprobs.shape[1], n_value), name, opts.options(),
    )
    return loss, metrics_from_stats(stats, ref_logprobs is not None, entropy is not None)
