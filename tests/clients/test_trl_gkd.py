"""erpd's GKDTrainer (erpd.adapters.trl_gkd) against TRL's own GKDTrainer (TRL's experimental GKD,
generalized_jsd_loss on materialized logits): the same tiny student and teacher trained a few
steps by both must log the same losses and end with the same weights, for the forward KL, the
JSD and the reverse KL, off-policy and with on-policy samples; and erpd's trainer must never
compute a [B, T, V] logits tensor."""

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is installed by requirements/test-clients.txt")
from _tiny_models import addition_conversations, causal_lm, tokenizer  # noqa: E402

STEPS = 3


def _train(trainer_cls, out_dir, kind="llama", student_head=None, teacher_head=None, **config):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig

    student = causal_lm(kind, seed=0, **(student_head or {}))
    # a different hidden size: erpd's fused teacher allows it
    teacher = causal_lm(kind, seed=1, hidden_size=48, **(teacher_head or {}))
    args = GKDConfig(
        output_dir=str(out_dir), per_device_train_batch_size=4, max_steps=STEPS, learning_rate=0.05, optim="sgd",
        logging_steps=1, report_to="none", seed=0, bf16=False, use_cpu=True, save_strategy="no", disable_tqdm=True,
        max_new_tokens=4, max_length=32, **config,
    )
    trainer = trainer_cls(model=student, teacher_model=teacher, args=args, processing_class=tokenizer(),
                          train_dataset=Dataset.from_dict({"messages": addition_conversations()}))
    trainer.train()
    return trainer.state.log_history, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("config", [
    dict(beta=0.5, lmbda=0.0), dict(beta=0.0, lmbda=0.0), dict(beta=1.0, lmbda=0.0), dict(beta=0.3, lmbda=1.0),
    # Granite divides both models' logits by logits_scaling: an inverse temperature of both
    dict(beta=0.5, lmbda=0.0, kind="granite", student_head=dict(logits_scaling=0.5), teacher_head=dict(logits_scaling=0.5)),
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if k in ("beta", "lmbda", "kind")))
def test_same_training_as_trl(tmp_path, config, monkeypatch):
    from trl.experimental.gkd import GKDTrainer as TRLGKDTrainer

    from erpd.adapters.trl_gkd import GKDTrainer

    log_trl, w_trl = _train(TRLGKDTrainer, tmp_path / "trl", **config)

    # erpd's loss computes no logits: the LM heads never run as modules inside compute_loss (on-policy
    # generation does run them, outside it).
    def no_logits(module, args):
        raise AssertionError("an LM head ran in compute_loss: logits were materialized")

    real_loss = GKDTrainer.compute_loss

    def compute_loss(self, *a, **k):
        hooks = [m.get_output_embeddings().register_forward_pre_hook(no_logits) for m in (self.model, self.teacher_model)]
        try:
            return real_loss(self, *a, **k)
        finally:
            for h in hooks:
                h.remove()

    monkeypatch.setattr(GKDTrainer, "compute_loss", compute_loss)
    log_erpd, w_erpd = _train(GKDTrainer, tmp_path / "erpd", **config)

    losses_trl = [e["loss"] for e in log_trl if "loss" in e]
    losses_erpd = [e["loss"] for e in log_erpd if "loss" in e]
    assert len(losses_trl) == STEPS and losses_trl[0] > 1e-3
    assert losses_erpd == pytest.approx(losses_trl, rel=1e-4, abs=1e-7)
    for name, w in w_trl.items():
        torch.testing.assert_close(w_erpd[name], w, rtol=1e-5, atol=1e-6, msg=lambda m: f"weight {name}: {m}")


@pytest.mark.parametrize("kind, student_head, teacher_head", [
    ("gemma2", {}, {}),  # final_logit_softcapping
    ("granite", dict(logits_scaling=0.5), dict(logits_scaling=2.0)),
])
def test_heads_it_cannot_match_are_refused(tmp_path, kind, student_head, teacher_head):
    from erpd.adapters.trl_gkd import GKDTrainer

    with pytest.raises(NotImplementedError, match="same logit scale and no softcapping"):
        _train(GKDTrainer, tmp_path, kind=kind, student_head=student_head, teacher_head=teacher_head, beta=0.5,
               lmbda=0.0)


def test_head_transform_reads_the_configs():
    import transformers

    from erpd.adapters.trl import head_transform

    assert head_transform(transformers.LlamaConfig()) == (1.0, None)
    assert head_transform(transformers.Gemma2Config(final_logit_softcapping=30.0)) == (1.0, 30.0)
    assert head_transform(transformers.GraniteConfig(logits_scaling=8.0)) == (0.125, None)
    assert head_transform(transformers.CohereConfig(logit_scale=0.0625)) == (0.0625, None)
