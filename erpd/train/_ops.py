"""The one place where the trainer reaches the fused ops, so that switching an op's
implementation (a new fused op landing, a fallback while one is missing) is a one-line change.
"""

from __future__ import annotations

import torch

import erpd
from erpd import reference

# erpd.linear_kl is the fused op; erpd.reference.linear_kl (float64-capable, materializes the
# logits) keeps the trainer usable on a checkout where the fused op is not built yet.
_FUSED_KL = getattr(erpd, "linear_kl", None)


def linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, with_entropy=False, backend="auto"):
    return erpd.linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, ignore_index=-100,
                                with_entropy=with_entropy, backend=backend)


def linear_kl(hidden, weight, targets, *, teacher_hidden, teacher_weight, teacher_bias=None, bias=None,
              direction="forward", temperature=1.0, backend="auto") -> torch.Tensor:
    """Per-token full-vocabulary KL between a fused teacher and the student (``direction`` as in
    ``erpd.linear_kl``: forward = KL(T‖S), reverse = KL(S‖T)); rows with target -100 give 0."""
    kw = dict(bias=bias, teacher_hidden=teacher_hidden.detach(), teacher_weight=teacher_weight.detach(),
              teacher_bias=None if teacher_bias is None else teacher_bias.detach(), direction=direction,
              temperature=temperature, ignore_index=-100)
    if _FUSED_KL is not None:
        return _FUSED_KL(hidden, weight, targets, backend=backend, **kw)
    return reference.linear_kl(hidden, weight, targets, **kw).float()
