"""The one place where the trainer reaches the fused ops, so that switching an op's
implementation is a one-line change.
"""

from __future__ import annotations

import torch

import erpd


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
    return erpd.linear_kl(hidden, weight, targets, backend=backend, **kw)
