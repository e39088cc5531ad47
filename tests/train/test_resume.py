import pytest
import torch
from conftest import make_policy, synthetic_data, tiny_cfg, with_old_logprobs

from erpd.train import checked_io, checkpoint, stage1, stage2
from erpd.train.checked_io import CorruptFileError


def _no_eval(epoch, last):
    return {}


def _steps(out_dir, stage="stage1"):
    return [r for r in checked_io.read_jsonl(out_dir / stage / "metrics.jsonl") if r["kind"] == "step"]


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
    policy, data, cache = _setup()
    stage1.run(policy, data, cache, _cfg(1), tmp_path, _no_eval)
    (tmp_path / "stage1" / "checkpoint.pt").replace(tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=False)
    ck["stage"] = "stage2"
    checkpoint.save_checkpoint(tmp_path / "stage1" / "checkpoint.pt", ck)
    policy, data, cache = _setup()
    with pytest.raises(ValueError, match="not 'stage1'"):
        stage1.run(policy, data, cache, _cfg(2), tmp_path, _no_eval, resume=True)


class Crash(RuntimeError):
    pass


def _crashing(monkeypatch, stage_module, after_calls):
    """Make the stage's step function raise on its ``after_calls + 1``-th micro-batch: the
    process 'dies' in the middle of an optimizer step."""
    real = stage_module.make_step
    calls = {"n": 0}

    def make_step(*a, **k):
        step = real(*a, **k)

        def crashing(*sa, **sk):
            calls["n"] += 1
            if calls["n"] > after_calls:
                raise Crash(f"killed in micro-batch {calls['n']}")
            return step(*sa, **sk)

        return crashing

    monkeypatch.setattr(stage_module, "make_step", make_step)
    return lambda: monkeypatch.setattr(stage_module, "make_step", real)


def _flat(policy):
    return torch.cat([p.detach().flatten() for _, p in policy.trainable_named()])



@pytest.mark.parametrize("every,crash_step", [(1, 5), (2, 5), (1, 2)])
def test_crash_mid_epoch_loses_at_most_checkpoint_every_steps(tmp_path, monkeypatch, every, crash_step):
    """12 responses, mini-batches of 4 in micro-batches of 2: 3 steps per epoch, 2 epochs.
    The run dies inside step ``crash_step``; resumed, it redoes at most ``every`` steps and ends
    exactly where an uninterrupted run ends (same step losses, same weights, same optimizer)."""
    cfg = _cfg(2)
    cfg.stage1.checkpoint_every = every
    policy, data, cache = _setup()
    stage1.run(policy, data, cache, cfg, tmp_path / "a", _no_eval)
    straight, final = _steps(tmp_path / "a"), _flat(policy)

    policy, data, cache = _setup()
    restore = _crashing(monkeypatch, stage1, after_calls=2 * (crash_step - 1))
    with pytest.raises(Crash):
        stage1.run(policy, data, cache, cfg, tmp_path / "b", _no_eval)
    restore()
    ck = torch.load(tmp_path / "b" / "stage1" / "checkpoint.pt", weights_only=False)
    assert crash_step - 1 - ck["step"] < every  # lost no more than `every` steps (here: the crashed one included)
    policy, data, cache = _setup()
    stage1.run(policy, data, cache, cfg, tmp_path / "b", _no_eval, resume=True)
    resumed = _steps(tmp_path / "b")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]  # nothing logged twice or lost
    nxt = ck["step"]  # the first step the resumed run took
    assert resumed[nxt]["loss"] == pytest.approx(straight[nxt]["loss"], abs=1e-6) and straight[nxt]["loss"] != 0
    for a, b in zip(straight, resumed):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5
    assert torch.allclose(final, _flat(policy), atol=1e-6)
    # The epoch means of the interrupted epoch cover all of its steps, before and after the crash.
    ep = lambda d: [r for r in checked_io.read_jsonl(d / "stage1" / "metrics.jsonl") if r["kind"] == "epoch"]  # noqa: E731
    for a, b in zip(ep(tmp_path / "a"), ep(tmp_path / "b")):
        assert a["epoch"] == b["epoch"] and a.get("train_loss", 0) == pytest.approx(b.get("train_loss", 0), abs=1e-6)


def test_stage2_crash_mid_epoch_with_reanchor(tmp_path, monkeypatch):
    policy, data, cache = _setup()
    stage1.run(policy, data, cache, _cfg(1), tmp_path, _no_eval)
    teacher = [tmp_path / "teacher"]
    cfg = _cfg(2)
    cfg.stage2.checkpoint_every = 1
    policy, data, cache = _setup()
    stage2.run(policy, data, cache, cfg, tmp_path / "a", _no_eval, teacher)
    straight, final = _steps(tmp_path / "a", "stage2"), _flat(policy)
    policy, data, cache = _setup()
    restore = _crashing(monkeypatch, stage2, after_calls=2 * 4)  # dies in step 5 (epoch 2)
    with pytest.raises(Crash):
        stage2.run(policy, data, cache, cfg, tmp_path / "b", _no_eval, teacher)
    restore()
    policy, data, cache = _setup()
    stage2.run(policy, data, cache, cfg, tmp_path / "b", _no_eval, teacher, resume=True)
    resumed = _steps(tmp_path / "b", "stage2")
    assert len(resumed) == len(straight) == 6
    for a, b in zip(straight, resumed):
        assert abs(a["loss"] - b["loss"]) < 1e-6
    assert torch.allclose(final, _flat(policy), atol=1e-6)


def test_crash_in_a_subprocess_then_resume(tmp_path):
    """A real process death (os._exit in the middle of step 5, no cleanup), then a resume in a
    fresh process: the same final weights as an uninterrupted run."""
    import os
    import subprocess
    import sys

    script = f"""
import os, sys, torch
sys.path.insert(0, {os.path.dirname(__file__)!r})
import test_resume as T
from erpd.train import stage1
mode, out = sys.argv[1], sys.argv[2]
cfg = T._cfg(2); cfg.stage1.checkpoint_every = 1
policy, data, cache = T._setup()
if mode == "crash":
    real = stage1.make_step
    def make_step(*a, **k):
        step, n = real(*a, **k), [0]
        def s(*sa, **sk):
            n[0] += 1
            if n[0] > 8:
                os._exit(9)
            return step(*sa, **sk)
        return s
    stage1.make_step = make_step
stage1.run(policy, data, cache, cfg, out, T._no_eval, resume=(mode == "resume"))
torch.save(T._flat(policy), os.path.join(out, "final.pt"))
"""
    env = dict(os.environ, ERPD_PROGRESS="0", OMP_NUM_THREADS="1")
    run = lambda mode, out: subprocess.run([sys.executable, "-c", script, mode, str(out)], env=env,  # noqa: E731
                                           capture_output=True, text=True, timeout=300)
    p = run("plain", tmp_path / "a")
    assert p.returncode == 0, p.stderr[-2000:]
    p = run("crash", tmp_path / "b")
    assert p.returncode == 9, p.stderr[-2000:]
    assert torch.load(tmp_path / "b" / "stage1" / "checkpoint.pt", weights_only=False)["step"] == 4  # mid-epoch 2
    p = run("resume", tmp_path / "b")
    assert p.returncode == 0, p.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "a" / "final.pt"), torch.load(tmp_path / "b" / "final.pt"))
    assert [r["loss"] for r in _steps(tmp_path / "a")] == [r["loss"] for r in _steps(tmp_path / "b")]


def test_truncated_checkpoint_is_reported(tmp_path):
    policy, data, cache = _setup()
    stage1.run(policy, data, cache, _cfg(1), tmp_path, _no_eval)
    ck = tmp_path / "stage1" / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
    policy, data, cache = _setup()
    with pytest.raises(CorruptFileError, match="checkpoint.pt: no erpd checksum at its end .*truncated"):
        stage1.run(policy, data, cache, _cfg(2), tmp_path, _no_eval, resume=True)
