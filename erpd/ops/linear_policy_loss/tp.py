"""The vocabulary-parallel `linear_policy_loss`: the vocabulary-parallel log-probs and entropy
(erpd/ops/linear_logprobs/tp.py; identical on every rank after its all-reduces) go through
`erpd.policy_loss`, whose gradient flows back into the vocabulary-parallel log-prob backward, so
gspo and the sequence aggregations need nothing special."""

from __future__ import annotations

from erpd.ops import _validate
from erpd.ops.linear_logprobs.tp import linear_logprobs
from erpd.ops.options import PolicyOptions
from erpd.ops.policy_loss import policy_loss


def linear_policy_loss(hidden, weight, bias, targets, old_logprobs, advantages, mask, options: PolicyOptions, *,
                       temperature, ignore_index, backend, validate, tp_group, vocab_start, is_weights, ref_logprobs,
                       num_items):
    """Returns (loss, metrics, log-probs); `erpd.policy_loss` validates the options."""
    check_values = _validate.want_value_checks(hidden.device, validate)
    targets = _validate.targets(targets, hidden, 0, ignore_index, False)
    # Every value check runs here, once, as in the unsharded op: the mask still holds the caller's
    # values (policy_loss below sees a bool), so policy_loss is told not to check again.
    old_logprobs, advantages, mask, ref_logprobs, _, is_weights = _validate.policy_tensors(
        targets.shape, hidden.device, old_logprobs, advantages, mask, ref_logprobs, None, is_weights, check_values,
        old_optional=True,
    )
    _validate.num_items(num_items, hidden.device, check_values)
    logp, entropy = linear_logprobs(
        hidden, weight, bias, targets, temperature=temperature, ignore_index=ignore_index, with_entropy=True,
        backend=backend, check_values=check_values, tp_group=tp_group, vocab_start=vocab_start,
    )
    valid = (mask != 0) & (targets != ignore_index)
    loss, metrics = policy_loss(
        logp, logp.detach() if old_logprobs is None else old_logprobs, advantages, valid, options=options,
        entropy=entropy, ref_logprobs=ref_logprobs, is_weights=is_weights, num_items=num_items, backend=backend,
        validate=False,
    )
    return loss, metrics, logp
