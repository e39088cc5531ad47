"""erpd as TRL's fused LM head (erpd.adapters.trl.use_erpd), run inside TRL's own trainers.

TRL's GRPOTrainer and RLOOTrainer train a tiny random Llama for a few steps on CPU twice, with
TRL's kernel and with erpd's: every logged metric and every final weight must agree, erpd's
kernels must have run (counted at the op), and TRL's own kernel must not have. Then the fields of
TRL's fused forward (log-probs, entropy, log sum p^2, mean logit, top-1) on models with
softcapping (Gemma 2) and a logit scale (Granite), with and without erpd, values and gradients.
"""

from collections import Counter
from contextlib import nullcontext

import pytest
import torch

import erpd
from erpd.testing import assert_within_rule
from _tiny_models import addition_prompts, causal_lm, digit_reward, save_model_and_tokenizer, tokenizer

trl = pytest.importorskip("trl", reason="TRL is installed by requirements/test-clients.txt")
from erpd.adapters.trl import FIELDS, use_erpd  # noqa: E402

# Wall-clock and throughput entries of the log, which differ between any two runs.
TIMING = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")
STEPS = 3


@pytest.fixture
def erpd_kernel_calls(monkeypatch):
    """Counts the calls of erpd's fused kernels (the registered ops every backend runs), by name."""
    calls = Counter()
    real = erpd.ops._library.impl

    def counting(backend, name):
        op = real(backend, name)

        def run(*args):
            calls[name] += 1
            return op(*args)

        return run

    monkeypatch.setattr(erpd.ops._library, "impl", counting)
    return calls


@pytest.fixture
def trl_kernel_calls(monkeypatch):
    """Counts the forwards of TRL's own chunked log-prob kernel."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    calls = Counter()
    real = ChunkedLogProbFunction.forward

    def forward(ctx, *args, **kwargs):
        calls["forward"] += 1
        return real(ctx, *args, **kwargs)

    monkeypatch.setattr(ChunkedLogProbFunction, "forward", staticmethod(forward))
    return calls


def _train(model_path, out_dir, trainer_name, *, with_erpd, **config):
    from datasets import Dataset

    trainer_cls, config_cls = getattr(trl, f"{trainer_name}Trainer"), getattr(trl, f"{trainer_name}Config")
    args = config_cls(
        output_dir=str(out_dir), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
        max_steps=STEPS, learning_rate=0.05, optim="sgd", logging_steps=1, report_to="none", seed=0, bf16=False,
        use_cpu=True, save_strategy="no", disable_tqdm=True, **config,
    )
    with use_erpd() if with_erpd else nullcontext():
        trainer = trainer_cls(model=model_path, reward_funcs=digit_reward, args=args, processing_class=tokenizer(),
                              train_dataset=Dataset.from_dict({"prompt": addition_prompts()}))
        trainer.train()
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return trainer.state.log_history, weights


def _assert_same_run(trl_run, erpd_run):
    (log_t, w_t), (log_e, w_e) = trl_run, erpd_run
    assert len(log_t) == len(log_e) == STEPS + 1
    for step, (a, b) in enumerate(zip(log_t, log_e)):
        assert set(a) == set(b)
        for key in set(a) - set(TIMING):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), f"step {step + 1}: {key}"
    for name, w in w_t.items():
        torch.testing.assert_close(w_e[name], w, rtol=1e-5, atol=1e-6, msg=lambda m: f"weight {name}: {m}")
    # The run did train: the weights moved.
    assert log_t[-2]["grad_norm"] > 0


CASES = [
    ("GRPO", dict(loss_type="grpo", beta=0.0)),
    ("GRPO", dict(loss_type="dapo", beta=0.04)),
    ("GRPO", dict(loss_type="dr_grpo", beta=0.04, num_iterations=2, temperature=0.8)),
    ("RLOO", dict(beta=0.05)),
]


@pytest.mark.parametrize("trainer_name, config", CASES, ids=lambda c: c if isinstance(c, str) else
                         "-".join(f"{k}={v}" for k, v in c.items()))
def test_trainer_runs_erpd_kernels_with_the_same_result(tmp_path, erpd_kernel_calls, trl_kernel_calls,
                                                        trainer_name, config):
    model = save_model_and_tokenizer(tmp_path / "model")
    baseline = _train(model, tmp_path / "trl", trainer_name, with_erpd=False, **config)
    assert trl_kernel_calls["forward"] > 0 and not erpd_kernel_calls
    trl_calls = trl_kernel_calls["forward"]
    with_erpd = _train(model, tmp_path / "erpd", trainer_name, with_erpd=True, **config)
    _assert_same_run(baseline, with_erpd)
    # Every fused-head forward of the second run went to erpd (TRL's kernel: no new call).
    assert trl_kernel_calls["forward"] == trl_calls
    assert erpd_kernel_calls["linear_logprobs_fwd"] == trl_calls
    assert erpd_kernel_calls["linear_logprobs_bwd"] == STEPS  # one backward per optimizer step


def test_use_erpd_restores_trl_and_counts():
    from trl.trainer import utils

    own = utils._ChunkedLogProbFunction
    with use_erpd(backend="torch") as installed:
        assert utils._ChunkedLogProbFunction is installed.kernel
    assert utils._ChunkedLogProbFunction is own


def test_use_erpd_refuses_trl_without_the_fused_head(monkeypatch):
    monkeypatch.setattr(trl, "__version__", "1.12.0")
    with pytest.raises(RuntimeError, match=r"needs TRL >= 1.15.0 .*FusedLinearGRPOLoss"):
        use_erpd()


# --------------------------------------------------------------------------------------------
# The fields of TRL's fused forward on softcapped and scaled heads
# --------------------------------------------------------------------------------------------

MODELS = [
    ("llama", {}),
    ("gemma2", dict(final_logit_softcapping=1.5)),  # tight enough to bend the random model's logits
    ("granite", dict(logits_scaling=0.6)),
]


def _fused_fields(model, ids, labels, temperature, autocast):
    model.zero_grad()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
    with ctx:
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    (out.log_probs.sum() + 0.3 * out.entropy.sum()).backward()
    fields = {f: getattr(out, f).detach() for f in FIELDS}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return fields, grads


@pytest.mark.parametrize("backend", [b for b in erpd.available("cpu") if b != "torch"])
@pytest.mark.parametrize("kind, overrides", MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
def test_fused_head_fields_match_trl(kind, overrides, backend, autocast):
    """fp32: erpd gives TRL's fields and gradients. Under bf16 autocast both differ from the fp32
    values; erpd's error may be at most twice TRL's (TRL rounds each logits tile to bf16 on CPU)."""
    from trl.trainer.utils import add_fused_lm_head

    model = causal_lm(kind, seed=1, **overrides)
    add_fused_lm_head(model, temperature=0.9, outputs=FIELDS)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, model.config.vocab_size, (3, 11), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    trl_out, trl_grads = _fused_fields(model, ids, labels, 0.9, autocast)
    with use_erpd(backend=backend) as installed:
        erpd_out, erpd_grads = _fused_fields(model, ids, labels, 0.9, autocast)
    assert installed.kernel.calls == 1
    assert set(erpd_grads) == set(trl_grads)
    if not autocast:
        for f in FIELDS:
            torch.testing.assert_close(erpd_out[f], trl_out[f], rtol=1e-4, atol=1e-5, msg=lambda m: f"{f}: {m}")
        for name, grad in trl_grads.items():
            torch.testing.assert_close(erpd_grads[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")
        return
    truth, truth_grads = _fused_fields(model, ids, labels, 0.9, autocast=False)
    for f in FIELDS:
        if f == "is_top1":
            assert (erpd_out[f] == truth[f]).sum() >= (trl_out[f] == truth[f]).sum() - 1
        else:
            assert_within_rule(erpd_out[f], truth[f].double(), trl_out[f], name=f)
    for name, grad in truth_grads.items():
        assert_within_rule(erpd_grads[name], grad.double(), trl_grads[name], name=f"d{name}", floor=1e-3)
