import json

import pytest

from erpd import cli
from erpd.train import config as C

TINY = ["model.name=tiny", "model.train_layers=1", "task.n_train=2", "task.n_heldout=2", "task.n_other=2", "sample.k=4",
        "sample.max_new_tokens=4", "eval.max_new_tokens=4", "stage1.epochs=2", "stage2.epochs=1",
        "task.verifier=_helpers.parity"]


def test_demo_smoke(tmp_path, capsys):
    # The plot needs matplotlib from requirements/demo.txt.
    pytest.importorskip("matplotlib", reason="install requirements/demo.txt to run the CLI smoke test")
    out = tmp_path / "run"
    assert cli.main(["demo", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    for row in ("| base |", "| teacher |", "| student |", "| student − base |", "| student − teacher |"):
        assert row in printed, row
    summary = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in summary["rows"]] == ["base", "teacher", "student"]
    assert summary["rows"][0]["drift"]["kl_full"] == 0 and summary["rows"][1]["drift"]["kl_full"] > 0
    assert (out / "summary.md").read_text().strip() in printed
    assert (out / "erpd.png").stat().st_size > 1000
    for name in ("base", "teacher", "student"):
        ev = json.loads((out / "eval" / f"{name}.json").read_text())
        assert set(ev["splits"]) == {"task", "other"} and all(len(v["correct"]) == 2 for v in ev["splits"].values())
    for stage, n in (("stage1", 2), ("stage2", 1)):
        epochs = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        epochs = [r for r in epochs if r["kind"] == "epoch"]
        assert [r["epoch"] for r in epochs] == list(range(n + 1))
        for key in ("loss", "logratio", "kl_k1", "kl_k3", "kl_full", "entropy", "clip_frac", "out_of_band", "auc"):
            assert any(key in k for r in epochs[1:] for k in r), key
    for d in ("data", "teacher", "student"):
        assert (out / d).is_dir()
    for name in ("base", "teacher", "student"):  # the demo exports its policies (tests/train/test_export.py)
        assert (out / name / "hf" / "config.json").is_file() and (out / name / "hf" / "manifest.json").is_file()

    # --resume finds everything done and only rewrites the summary.
    assert cli.main(["demo", "--out", str(out), "--resume"]) == 0
    assert "| student |" in capsys.readouterr().out

    # control: PPO on the rewards with stage 2's budget; it joins the summary.
    assert cli.main(["control", "--out", str(out), *TINY]) == 0
    assert "| student − control |" in capsys.readouterr().out
    assert (out / "control" / "policy").is_dir() and (out / "eval" / "control.json").is_file()

    # eval re-measures the saved policies.
    assert cli.main(["eval", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "| base |" in printed and "| student − teacher |" in printed


def test_bad_override_is_a_usage_error(tmp_path, capsys):
    assert cli.main(["sample", "--out", str(tmp_path), "stage1.epoch=3"]) == 2
    assert "unknown config key 'stage1.epoch'" in capsys.readouterr().err


def test_none_is_null_only_where_a_field_may_be_null():
    cfg = C.build(None, ["stage2.center=none", "stage2.gating=none", "stage1.clip_high=none", "stage2.signal_clip=null",
                         "stage1.grad_clip=None"])
    assert cfg.stage2.center == "none" and cfg.stage2.gating == "none"
    assert cfg.stage1.clip_high is None and cfg.stage2.signal_clip is None and cfg.stage1.grad_clip is None


def test_config_layers(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("stage1:\n  objective: sapo\n  epochs: 3\nmodel:\n  train_layers: null\n")
    cfg = C.build(str(f), ["stage1.epochs=5", "--stage2.signal", "opd", "--stage2.teachers=[a, b]", "stage1.clip_high=0.5", "stage2.lr=5e-4"])
    assert cfg.stage1.objective == "sapo" and cfg.stage1.epochs == 5 and cfg.model.train_layers is None
    assert cfg.stage2.signal == "opd" and cfg.stage2.teachers == ["a", "b"] and cfg.stage1.clip_high == 0.5
    assert cfg.stage2.lr == 5e-4  # YAML 1.1 reads 5e-4 as a string; float fields accept it
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"sample": {"k": 4}}))
    assert C.build(str(j)).sample.k == 4
    assert C.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override, match", [
    (["stage1.epochs=many"], "expected an integer"),
    (["stage1.objective=grpo"], "stage1.objective must be"),
    (["sample.k=1"], "sample.k must be >= 2"),
    (["model.dist_timeout_minutes=0"], "dist_timeout_minutes must be > 0"),
    (["nope.x=1"], "unknown config key 'nope'"),
    (["stage1.epochs"], "section.key=value"),
    # finite and in range (each of these was accepted and trained on)
    (["stage1.lr=1e999"], "stage1.lr: expected a finite number, got '1e999'"),
    (["stage1.grad_clip=nan"], "stage1.grad_clip: expected a finite number"),
    (["stage1.beta=.nan"], "stage1.beta: expected a finite number"),
    (["stage1.beta=0"], "stage1.beta must be > 0"),
    (["stage1.weight_decay=-1"], "stage1.weight_decay must be >= 0"),
    (["stage2.teacher_weights=[1, .inf]"], r"stage2.teacher_weights\[1\] must be finite, got inf"),
    (["model.backend=gpu"], "model.backend must be one of"),
    # the op's own checks, named by the config key
    (["stage1.clip_low=1.5"], "stage1.clip_low must be <= 1.0, got 1.5"),
    (["stage1.clip_high=-0.1"], "stage1.clip_high must be >= 0.0"),
    (["stage1.tau_neg=0"], "stage1.tau_neg must be > 0.0"),
    (["stage1.cispo_cap=0"], "stage1.cispo_cap must be > 0.0"),
    (["stage1.kl_estimator=k4"], "stage1.kl_estimator must be one of"),
    (["stage2.clip=1.5"], "stage2.clip must be <= 1.0, got 1.5"),
    (["sample.temperature=0"], "sample.temperature must be finite and > 0"),
])
def test_config_errors(override, match):
    with pytest.raises(C.ConfigError, match=match):
        C.build(None, override)


def test_config_built_in_code_is_validated_too():
    cfg = C.RunConfig()
    cfg.stage1.lr = float("inf")
    with pytest.raises(C.ConfigError, match="stage1.lr must be finite, got inf"):
        C.validate(cfg)


@pytest.mark.parametrize("key, op_kw", [("stage1.clip_low", "clip_low"), ("stage1.clip_high", "clip_high"),
                                        ("stage1.tau_pos", "tau_pos"), ("stage1.cispo_cap", "cispo_cap")])
def test_trainer_accepts_exactly_what_the_op_accepts(key, op_kw):
    """One validation for both: a policy-loss knob is valid in the config iff erpd.policy_loss takes it."""
    import torch

    import erpd

    lp = torch.full((1, 2), -1.0)
    for v in (-0.5, 0.0, 0.1, 0.99, 1.0, 1.5, 7.0):
        try:
            erpd.policy_loss(lp, lp, torch.ones(1), torch.ones(1, 2), method="cispo" if op_kw == "cispo_cap" else "ppo",
                             **{op_kw: v})
            op_ok = True
        except ValueError:
            op_ok = False
        try:
            C.build(None, [f"{key}={v}"])
            cfg_ok = True
        except C.ConfigError:
            cfg_ok = False
        assert cfg_ok == op_ok, (key, v, op_ok)


def test_fsdp_flag_and_new_knobs(capsys):
    assert cli.main(["stage1", "--fsdp", "--print-config", "stage1.checkpoint_every=5", "stage2.pack=true"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["model"]["fsdp"] is True and cfg["stage1"]["checkpoint_every"] == 5 and cfg["stage2"]["pack"] is True
    assert cli.main(["stage1", "--print-config", "stage1.checkpoint_every=-1"]) == 2
    assert "checkpoint_every must be >= 0" in capsys.readouterr().err
