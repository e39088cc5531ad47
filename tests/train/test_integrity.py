"""Fault injection: nothing corrupt is trained on, nothing non-finite is written, every failure
names its cause (erpd/train/checked_io.py and its call sites).

Flipped bytes and truncation in each kind of file the trainer writes and reads back (checkpoint,
saved policy, manifests, eval/base.json, config.json), non-finite weights (teacher, checkpoint,
base model), non-finite steps, a torn metrics.jsonl, and a full disk (a real small tmpfs where
the machine lets an unprivileged user namespace mount one, else skipped).
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_policy, tiny_cfg
from test_resume import _cfg, _flat, _no_eval, _setup, _steps

from erpd import cli
from erpd.train import checked_io, checkpoint, loop, models, stage1, stage2
from erpd.train.checked_io import CorruptFileError, DiskFullError, NonFiniteError
from erpd.train.models import load_policy_state, save_policy_state


def _flip(path, where=0.5, bit=0x10):
    raw = bytearray(path.read_bytes())
    i = min(len(raw) - 1, int(where * len(raw)))
    raw[i] ^= bit
    path.write_bytes(bytes(raw))


def _truncate(path, keep=0.6):
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


# ---------------------------------------------------------------------------------------------
# checked_io's formats


@pytest.mark.parametrize("where", [0.0, 0.3, 0.9, 0.999])
def test_checkpoint_file_detects_any_flipped_byte(tmp_path, where):
    path = tmp_path / "ck.pt"
    state = {"w": torch.randn(64, 8), "step": 3}
    checked_io.save_torch(path, state)
    assert torch.equal(torch.load(path, weights_only=False)["w"], state["w"])  # still a plain torch.save file
    assert torch.equal(checked_io.load_torch(path)["w"], state["w"])
    _flip(path, where)
    with pytest.raises(CorruptFileError, match=r"ck\.pt: (sha256 does not match|no erpd checksum)"):
        checked_io.load_torch(path)


def test_checked_json_detects_edits(tmp_path):
    path = tmp_path / "x.json"
    checked_io.write_json(path, {"reward": 0.25, "n": 4, "nested": {"a": [1, 2]}})
    assert checked_io.read_json(path) == {"reward": 0.25, "n": 4, "nested": {"a": [1, 2]}}
    path.write_text(path.read_text().replace("0.25", "0.75"))
    with pytest.raises(CorruptFileError, match=r"x\.json: its content does not match its sha256"):
        checked_io.read_json(path)
    path.write_text(path.read_text()[:20])
    with pytest.raises(CorruptFileError, match=r"x\.json:\d+:\d+: not valid JSON"):
        checked_io.read_json(path)


def test_truncated_safetensors_names_the_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(32, 32)}, str(path))
    _truncate(path, 0.5)
    with pytest.raises(CorruptFileError, match=r"model\.safetensors: unreadable safetensors file"):
        checked_io.load_safetensors(path)


def test_jsonl_drops_a_torn_last_line_and_names_a_bad_one(tmp_path, capsys):
    path = tmp_path / "m.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b"')
    assert checked_io.read_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert "m.jsonl:3: dropped a torn last line" in capsys.readouterr().err
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3}')  # a complete last line without its newline is kept
    assert checked_io.read_jsonl(path)[-1] == {"a": 3}
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(CorruptFileError, match=r"m\.jsonl:2: not valid JSON"):
        checked_io.read_jsonl(path)


# ---------------------------------------------------------------------------------------------
# checkpoints


@pytest.fixture
def stage1_run(tmp_path):
    policy, data, cache = _setup()
    stage1.run(policy, data, cache, _cfg(1), tmp_path, _no_eval)
    return tmp_path


def _resume(out, epochs=2):
    policy, data, cache = _setup()
    stage1.run(policy, data, cache, _cfg(epochs), out, _no_eval, resume=True)
    return policy


@pytest.mark.parametrize("where", [0.02, 0.5, 0.95])
def test_resume_refuses_a_checkpoint_with_a_flipped_byte(stage1_run, where):
    """Before: --resume loaded flipped payload bytes silently (a teacher with 1e24 weights)."""
    _flip(stage1_run / "stage1" / "checkpoint.pt", where, bit=0x40)
    with pytest.raises(CorruptFileError, match=r"stage1/checkpoint\.pt: sha256 does not match .* delete it"):
        _resume(stage1_run)


def test_resume_refuses_a_checkpoint_with_non_finite_weights(stage1_run):
    path = stage1_run / "stage1" / "checkpoint.pt"
    ck = checked_io.load_torch(path)
    name = next(iter(ck["trainable"]))
    ck["trainable"][name][0, 0] = float("nan")
    checked_io.save_torch(path, ck)  # a valid checksum over bad values
    with pytest.raises(NonFiniteError, match=rf"checkpoint\.pt \(weights\): {name} has 1 non-finite value"):
        _resume(stage1_run)
    with pytest.raises(NonFiniteError, match="writing .*checkpoint.pt"):  # and none is ever written
        checkpoint.save_checkpoint(path, ck)


# ---------------------------------------------------------------------------------------------
# saved policies (teacher / student)


@pytest.fixture
def teacher(tmp_path):
    policy = make_policy(train_layers=1)
    with torch.no_grad():
        for _, p in policy.trainable_named():
            p.mul_(1.1)
    return save_policy_state(policy, tmp_path / "teacher", meta={"note": "x"})


@pytest.mark.parametrize("name, fault, match", [
    ("model.safetensors", "flip", r"teacher/model\.safetensors: sha256 does not match the manifest"),
    ("model.safetensors", "truncate", r"teacher/model\.safetensors: \d+ bytes, the manifest says \d+ \(truncated"),
    ("policy.json", "flip", r"teacher/policy\.json: sha256 does not match the manifest"),
    ("manifest.json", "edit", r"teacher/manifest\.json: its content does not match its sha256"),
    ("manifest.json", "truncate", r"teacher/manifest\.json:\d+:\d+: not valid JSON"),
    ("manifest.json", "delete", r"teacher: no manifest\.json"),
])
def test_teacher_with_a_fault_is_refused_by_name(teacher, name, fault, match):
    """Before: stage 2 used a teacher with one flipped byte silently (uniform entropy)."""
    path = teacher / name
    if fault == "flip":
        _flip(path, 0.7, bit=0x01)
    elif fault == "truncate":
        _truncate(path)
    elif fault == "edit":
        path.write_text(path.read_text().replace('"bytes": ', '"bytes": 1'))
    else:
        path.unlink()
    policy = make_policy(train_layers=1)
    with pytest.raises(CorruptFileError, match=match):
        load_policy_state(policy, teacher)


def test_stage2_refuses_a_corrupt_teacher(teacher):
    _flip(teacher / "model.safetensors", 0.5)
    policy, data, cache = _setup()
    with pytest.raises(CorruptFileError, match="model.safetensors: sha256"):
        stage2.run(policy, data, cache, _cfg(1), teacher.parent / "out", _no_eval, [teacher])


def test_teacher_with_non_finite_weights_is_refused(teacher):
    from safetensors.torch import load_file, save_file

    path = teacher / "model.safetensors"
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("inf")
    save_file(tensors, str(path))
    checked_io.write_manifest(teacher, ["model.safetensors", "policy.json"], models.POLICY_FORMAT, models.POLICY_VERSION)
    with pytest.raises(NonFiniteError, match=rf"teacher/model\.safetensors: {name} has 1 non-finite value"):
        load_policy_state(make_policy(train_layers=1), teacher)
    policy = make_policy(train_layers=1)
    with torch.no_grad():
        policy.trainable_named()[0][1].view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError, match="saving the policy to"):
        save_policy_state(policy, teacher.parent / "nan")


def test_base_model_with_non_finite_weights_is_refused(monkeypatch):
    real = models._tiny

    def tiny_with_nan(cfg, seed):
        model, tok = real(cfg, seed)
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight[3, 3] = float("nan")
        return model, tok

    monkeypatch.setattr(models, "_tiny", tiny_with_nan)
    with pytest.raises(NonFiniteError, match=r"model.name='tiny': model\.layers\.0\.mlp\.up_proj\.weight has 1 non-finite"):
        make_policy()


def test_truncated_local_model_directory_is_named(tmp_path):
    policy = make_policy()
    d = tmp_path / "hf"
    policy.model.save_pretrained(d)
    policy.tokenizer.save_pretrained(d)
    assert models.load_policy(tiny_cfg(name=str(d)).model).name == str(d)  # loads as saved
    _truncate(d / "model.safetensors", 0.5)
    with pytest.raises(CorruptFileError, match=rf"model.name='{d}': could not load the model directory"):
        models.load_policy(tiny_cfg(name=str(d)).model)


# ---------------------------------------------------------------------------------------------
# non-finite steps


class _InfGrad(torch.autograd.Function):
    """0 in the forward, an infinite gradient in the backward: a finite loss, an infinite grad norm."""

    @staticmethod
    def forward(ctx, w):
        ctx.shape = w.shape
        return w.new_zeros(())

    @staticmethod
    def backward(ctx, g):
        return torch.full(ctx.shape, float("inf"))


def _poisoned(monkeypatch, bad_call, kind):
    """Stage 1's step function, with micro-batch `bad_call` (1-based) made non-finite."""
    real = stage1.make_step
    calls = {"n": 0}

    def make_step(policy, *a, **k):
        step = real(policy, *a, **k)
        w = policy.trainable_named()[0][1]

        def poisoned(*sa, **sk):
            out = step(*sa, **sk)
            calls["n"] += 1
            if calls["n"] == bad_call:
                bad = out.loss * float("nan") if kind == "loss" else out.loss + _InfGrad.apply(w)
                out = loop.StepOutput(loss=bad, stats=out.stats)
            return out

        return poisoned

    monkeypatch.setattr(stage1, "make_step", make_step)


@pytest.mark.parametrize("kind, match", [("loss", "loss nan"), ("grad", r"loss -?\d.*, gradient norm inf")])
def test_non_finite_step_stops_before_anything_is_written(tmp_path, monkeypatch, kind, match):
    """Before: NaN losses were logged, NaN checkpoints written, and the run died later in sampling."""
    cfg = _cfg(2)
    cfg.stage1.checkpoint_every = 1
    _poisoned(monkeypatch, bad_call=2 * 4 + 1, kind=kind)  # step 5 (epoch 2), first micro-batch
    policy, data, cache = _setup()
    with pytest.raises(NonFiniteError, match=rf"stage1 step 5: .*{match}.*stopped before the optimizer step"):
        stage1.run(policy, data, cache, cfg, tmp_path, _no_eval)
    ck = checked_io.load_torch(tmp_path / "stage1" / "checkpoint.pt")
    assert ck["step"] == 4  # the last good step's checkpoint, untouched
    steps = _steps(tmp_path)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(v == v for r in steps for v in r.values() if isinstance(v, float))  # no NaN logged
    # The policy holds the weights of step 4: the bad step changed nothing.
    assert torch.equal(_flat(policy), torch.cat([t.flatten() for t in ck["trainable"].values()]))
    assert not (tmp_path / "teacher").exists()


# ---------------------------------------------------------------------------------------------
# metrics.jsonl


def test_resume_drops_a_torn_last_metrics_line(tmp_path):
    """Before: a torn last line (what a full disk leaves) made --resume fail with JSONDecodeError."""
    policy, data, cache = _setup()
    stage1.run(policy, data, cache, _cfg(2), tmp_path / "a", _no_eval)
    straight = _steps(tmp_path / "a")
    policy, data, cache = _setup()
    stage1.run(policy, data, cache, _cfg(1), tmp_path / "b", _no_eval)
    with open(tmp_path / "b" / "stage1" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "stage": "stage1", "epoch": 2, "step": 4, "lo')
    _resume(tmp_path / "b")
    resumed = _steps(tmp_path / "b")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    for a, b in zip(straight, resumed):
        assert abs(a["loss"] - b["loss"]) < 1e-5
    checked_io.read_jsonl(tmp_path / "b" / "stage1" / "metrics.jsonl")  # every line whole again


# ---------------------------------------------------------------------------------------------
# the run directory's JSON files and the CLI


TINY = ["model.name=tiny", "model.train_layers=1", "task.n_train=2", "task.n_heldout=2", "task.n_other=2", "sample.k=4",
        "sample.max_new_tokens=4", "eval.max_new_tokens=4", "stage1.epochs=1", "stage2.epochs=1",
        "task.verifier=_helpers.parity"]


def test_cli_reports_corrupt_run_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["stage1", "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    # eval/base.json (π0's greedy answers, reused by later commands)
    be = out / "eval" / "base.json"
    be.write_text(be.read_text().replace('"max_new_tokens": 4', '"max_new_tokens": 5'))
    shutil.rmtree(out / "stage1")
    assert cli.main(["stage1", "--out", str(out), "--resume"]) == 1
    assert "base.json: its content does not match its sha256" in capsys.readouterr().err
    be.unlink()
    # config.json, the base of --resume
    cfg = out / "config.json"
    cfg.write_text(cfg.read_text().replace('"epochs": 1', '"epochs": 7', 1))
    assert cli.main(["stage1", "--out", str(out), "--resume"]) == 2
    assert 'config.json: its content does not match its sha256 checksum (the file was modified or corrupted); remove its "sha256" line' in capsys.readouterr().err
    # a flipped byte in the saved teacher stops stage 2 with the file's name, not a traceback
    cfg.write_text(json.dumps({k: v for k, v in json.loads(cfg.read_text()).items() if k != "sha256"}))
    _flip(out / "teacher" / "model.safetensors", 0.5)
    assert cli.main(["stage2", "--out", str(out), "--resume"]) == 1
    assert "teacher/model.safetensors: sha256 does not match the manifest" in capsys.readouterr().err


@pytest.mark.parametrize("name, text, match", [
    ("c.yaml", "stage1:\n  lr: 1e-4\n epochs: [3\n", r"c\.yaml:3:2: not valid YAML"),
    ("c.yaml", "stage1: {lr: 1e-4\n", r"c\.yaml:2:1: not valid YAML"),
    ("c.json", '{"stage1": {"lr": 1e-4,}}', r"c\.json:1:24: not valid JSON"),
    ("c.yaml", "- 1\n- 2\n", r"c\.yaml: a config file holds a mapping of sections"),
])
def test_malformed_config_file_names_file_and_line(tmp_path, capsys, name, text, match):
    f = tmp_path / name
    f.write_text(text)
    assert cli.main(["stage1", "--config", str(f), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert f"erpd: {f}" in err and __import__("re").search(match, err), err


# ---------------------------------------------------------------------------------------------
# a full disk


def _can_mount_tmpfs(tmp_path) -> bool:
    if not shutil.which("unshare"):
        return False
    mnt = tmp_path / "probe"
    mnt.mkdir()
    p = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {mnt}"],
                       capture_output=True, timeout=30)
    return p.returncode == 0


def test_disk_full_mid_checkpoint_says_so_and_resume_recovers(tmp_path):
    """Stage 1 on a 'disk' (a tmpfs in a private mount namespace) that holds one checkpoint but not
    a second one beside it: the write fails with "no space left on device" naming checkpoint.pt
    (before: "unexpected pos 804032 vs 803920"), the previous checkpoint is intact, and after
    freeing space --resume ends with the weights of an uninterrupted run."""
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("cannot mount a tmpfs here (needs unshare and unprivileged user namespaces)")
    here = os.path.dirname(__file__)
    # How large one checkpoint of this run is.
    policy, data, cache = _setup()
    cfg = _cfg(2)
    cfg.stage1.checkpoint_every = 1
    stage1.run(policy, data, cache, cfg, tmp_path / "a", _no_eval)
    ck_bytes = (tmp_path / "a" / "stage1" / "checkpoint.pt").stat().st_size
    final = _flat(policy)

    mnt = tmp_path / "disk"
    mnt.mkdir()
    # Room for the metrics and one checkpoint, not for the temporary copy of a second one.
    size = ck_bytes + ck_bytes // 2
    script = textwrap.dedent(f"""
        import subprocess, sys, torch
        sys.path.insert(0, {here!r})
        import test_resume as T
        from erpd.train import stage1
        from erpd.train.checked_io import DiskFullError
        cfg = T._cfg(2); cfg.stage1.checkpoint_every = 1
        policy, data, cache = T._setup()
        try:
            stage1.run(policy, data, cache, cfg, {str(mnt)!r}, T._no_eval)
            sys.exit("the disk did not fill up")
        except DiskFullError as e:
            print("DISKFULL", e)
        subprocess.run(["mount", "-o", "remount,size={8 * ck_bytes}", {str(mnt)!r}], check=True)  # free space
        policy, data, cache = T._setup()
        stage1.run(policy, data, cache, cfg, {str(mnt)!r}, T._no_eval, resume=True)
        torch.save(T._flat(policy), {str(tmp_path / "b.pt")!r})
    """)
    (tmp_path / "script.py").write_text(script)
    shell = (f"mount -t tmpfs -o size={size} tmpfs {mnt} && cd {tmp_path} && {sys.executable} script.py && "
             f"cp {mnt}/stage1/metrics.jsonl {tmp_path}/metrics.jsonl")
    env = dict(os.environ, ERPD_PROGRESS="0", OMP_NUM_THREADS="1")
    p = subprocess.run(["unshare", "-rm", "sh", "-c", shell], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    msg = next(line for line in p.stdout.splitlines() if line.startswith("DISKFULL"))
    assert f"{mnt}/stage1/checkpoint.pt: no space left on device" in msg and "previous version" in msg, msg
    assert torch.equal(torch.load(tmp_path / "b.pt"), final)
    straight = _steps(tmp_path / "a")
    resumed = [r for r in checked_io.read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]


def test_disk_full_is_named_for_any_write(tmp_path, monkeypatch):
    """Without a small filesystem: ENOSPC injected into the write itself (JSON, safetensors, metrics)."""
    import builtins
    import errno

    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, k):
            return getattr(self.f, k)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    policy = make_policy(train_layers=1)
    monkeypatch.setattr(builtins, "open", lambda f, mode="r", *a, **k: Full(real_open(f, mode, *a, **k))
                        if "w" in mode or "a" in mode else real_open(f, mode, *a, **k))
    with pytest.raises(DiskFullError, match=r"x\.json: no space left on device"):
        checked_io.write_json(tmp_path / "x.json", {"a": 1})
    assert not (tmp_path / "x.json.tmp").exists()
    with pytest.raises(DiskFullError, match=r"metrics\.jsonl: no space left on device"):
        checked_io.append_line(tmp_path / "metrics.jsonl", "{}")
    with pytest.raises(DiskFullError, match=r"model\.safetensors: no space left on device"):
        save_policy_state(policy, tmp_path / "teacher")
