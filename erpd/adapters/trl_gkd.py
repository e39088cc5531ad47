"""TRL's GKDTrainer with its divergence computed by erpd from hidden states (TRL 1.16's
``trl.experimental.gkd``; tested: 1.16.0).

TRL's ``GKDTrainer.compute_loss`` runs the student and the teacher to their ``[B, T, V]`` logits
and calls ``generalized_jsd_loss``. :class:`GKDTrainer` here is a drop-in subclass (same
constructor, same on-policy / sequence-KD sampling) whose ``compute_loss`` runs both backbones
only and hands the final hidden states and the two LM heads to
``erpd.linear_kl(direction="jsd", beta=args.beta)``: neither model's logits exist, and student and
teacher may have different hidden sizes. The loss is TRL's: the generalized JSD at temperature 1
(``compute_loss`` does not pass the sampling temperature), summed over the tokens whose label is
not -100 and divided by their count, or by ``num_items_in_batch`` when the trainer passes it.

    from erpd.adapters.trl_gkd import GKDTrainer        # instead of trl.experimental.gkd
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=GKDConfig(...), ...)

Evaluation calls ``compute_loss(..., return_outputs=True)`` for the student's logits, which only
TRL's path produces: that one call goes to TRL's loss.

Heads whose logits are scaled (Granite's ``logits_scaling``, Cohere's ``logit_scale``...) are
handled when student and teacher share the scale (it is then an inverse temperature of both);
softcapped heads (Gemma's ``final_logit_softcapping``) and unequal scales raise
NotImplementedError at construction: ``erpd.linear_kl`` has no per-side logit transform yet.
"""

from __future__ import annotations

import torch
from trl.experimental.gkd import GKDTrainer as _TRLGKDTrainer
from trl.models.utils import _ForwardRedirection

from erpd.adapters.trl import head_transform
from erpd.ops import linear_kl


def _backbone(model):
    """The decoder under a causal LM (a PEFT model's base model's), without the LM head."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.base_model, model.get_output_embeddings()


class GKDTrainer(_TRLGKDTrainer):
    """``trl.experimental.gkd.GKDTrainer`` whose loss is :func:`erpd.linear_kl` on hidden states;
    ``erpd_backend`` picks erpd's backend."""

    def __init__(self, *args, erpd_backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.erpd_backend = erpd_backend
        self._redirect = _ForwardRedirection()
        unwrap = self.accelerator.unwrap_model
        student, teacher = (head_transform(unwrap(m).config) for m in (self.model, self.teacher_model))
        if student[1] is not None or teacher[1] is not None or student[0] != teacher[0]:
            raise NotImplementedError(
                f"erpd's GKDTrainer needs student and teacher heads with the same logit scale and no softcapping "
                f"(erpd.linear_kl has no per-side logit transform yet); got (logit_scale, softcap) {student} for the "
                f"student and {teacher} for the teacher. Use trl.experimental.gkd.GKDTrainer for these models."
            )
        # A logit scale shared by both heads is an inverse temperature of both distributions.
        self._erpd_temperature = 1.0 / student[0]

    def _last_hidden(self, wrapped, inputs):
        """[B, T-1, H] final hidden states predicting tokens 1..T-1, through the (DDP/FSDP/DeepSpeed)
        wrapper's forward so that its hooks run; and the LM head."""
        unwrapped = self.accelerator.unwrap_model(wrapped)
        backbone, head = _backbone(unwrapped)

        def run(input_ids, attention_mask):
            return backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

        hidden = self._redirect(wrapped, unwrapped, run, inputs["input_ids"], inputs["attention_mask"])
        return hidden[:, :-1], head

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            return super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        hidden, head = self._last_hidden(model, inputs)
        self.teacher_model.eval()
        with torch.no_grad():
            t_hidden, t_head = self._last_hidden(self.teacher_model, inputs)
        labels = inputs["labels"][:, 1:]
        # The mean over the counted tokens (or over num_items_in_batch): its gradients are computed
        # in the forward, with no second pass over the vocabulary in the backward.
        return linear_kl(
            hidden, head.weight, labels, bias=head.bias, teacher_hidden=t_hidden, teacher_weight=t_head.weight,
            teacher_bias=t_head.bias, direction="jsd", beta=self.beta, temperature=self._erpd_temperature,
            backend=self.erpd_backend, reduction="mean",
            num_items=None if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=hidden.device),
        )


__all__ = ["GKDTrainer"]
