import torch
from conftest import make_policy, synthetic_data, tiny_cfg, with_old_logprobs

from erpd.train import engine, stage1, stage2


def _no_eval(epoch, last):
    return {}


def _steps(out_dir, stage="stage1"):
    return [r for r in engine.read_jsonl(out_dir / stage / "metrics.jsonl") if r["kind"] == "step"]


def _setup():
    policy = make_policy(train_layers=1)
    data = synthetic_data(policy, n_prompts=3, k=4, seed=3)
    cache = with_old_logprobs(policy, data)
    return policy, data, cache


def _cfg(epochs):
    cfg = tiny_cfg(train_layers=1)
    cfg.sample.temperature = 1.0
    cfg.stage1.epochs, cfg.stage1.batch_size, cfg.stage1.micro_batch_size = epochs, 4, 2
    cfg.stage2.epochs, cfg.stage2.batch_size, cfg.stage2.micro_batch_size = epochs, 4, 2
    cfg.stage2.reanchor = True  # the anchor is checkpointed state too
    return cfg


def test_resume_gives_the_same_next_step_loss(tmp_path):
    # Uninterrupted: 2 epochs.
    policy, data, cache = _setup()
    stage1.run(policy, data, cache, _cfg(2), tmp_path / "a", _no_eval)
    straight = _steps(tmp_path / "a")

    # Stopped after epoch 1, then resumed in a fresh process-like setting (new policy object = π0).
    policy, data, cache = _setup()
    stage1.run(policy, data, cache, _cfg(1), tmp_path / "b", _no_eval)
    policy, data, cache = _setup()
    stage1.run(policy, data, cache, _cfg(2), tmp_path / "b", _no_eval, resume=True)
    resumed = _steps(tmp_path / "b")

    assert [r["step"] for r in resumed] == [r["step"] for r in straight]  # no duplicated records
    first_after = [r for r in straight if r["epoch"] == 2][0]
    again = [r for r in resumed if r["epoch"] == 2][0]
    assert abs(first_after["loss"] - again["loss"]) < 1e-6 and first_after["loss"] != 0
    for a, b in zip(straight, resumed):
        assert abs(a["loss"] - b["loss"]) < 1e-5


def test_stage2_resume(tmp_path):
    policy, data, cache = _setup()
    stage1.run(policy, data, cache, _cfg(1), tmp_path, _no_eval)  # the teacher
    teacher = [tmp_path / "teacher"]

    def run(epochs, out, resume=False):
        policy, data, cache = _setup()
        stage2.run(policy, data, cache, _cfg(epochs), out, _no_eval, teacher, resume=resume)
        return _steps(out, "stage2")

    straight = run(2, tmp_path / "a")
    run(1, tmp_path / "b")
    resumed = run(2, tmp_path / "b", resume=True)
    assert len(straight) == len(resumed)
    for a, b in zip(straight, resumed):
        assert abs(a["loss"] - b["loss"]) < 1e-5


def test_checkpoint_is_not_mixed_across_stages(tmp_path):
    import pytest

    policy, data, cache = _setup()
    stage1.run(policy, data, cache, _cfg(1), tmp_path, _no_eval)
    (tmp_path / "stage1" / "checkpoint.pt").replace(tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=False)
    ck["stage"] = "stage2"
    torch.save(ck, tmp_path / "stage1" / "checkpoint.pt")
    policy, data, cache = _setup()
    with pytest.raises(ValueError, match="not 'stage1'"):
        stage1.run(policy, data, cache, _cfg(2), tmp_path, _no_eval, resume=True)
