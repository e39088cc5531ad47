"""``erpd export``: a run's policy as a Hugging Face model directory that transformers loads
without erpd, with the trained weights in place."""

import json
import subprocess
import sys

import pytest
import torch

from erpd import cli
from erpd.train import checked_io
from erpd.train.export import verify_export

from test_cli import TINY


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    assert cli.main(["stage1", "--out", str(out), *TINY]) == 0
    assert cli.main(["stage2", "--out", str(out), *TINY]) == 0
    return out


_LOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(d)
ids = tok("Tom has 3 apples.", return_tensors="pt", add_special_tokens=False)["input_ids"]
with torch.no_grad():
    logits = model(input_ids=ids).logits[0]
assert "erpd" not in sys.modules
print(json.dumps({"ids": ids[0].tolist(), "logits": logits.tolist()}))
"""


def _logits_in_erpd(run, policy_name, ids):
    from erpd.train import config as C
    from erpd.train.models import load_policy_state
    from erpd.train.pipeline import Run

    cfg = C.from_dict(C.load_file(run / "config.json"))
    cfg.out_dir = str(run)
    r = Run(cfg, resume=True, write_config=False)
    if policy_name != "base":
        load_policy_state(r.policy, r.policy_dir(policy_name))
    with torch.no_grad():
        return r.policy.model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("policy", ["base", "teacher", "student"])
def test_export_loads_without_erpd_and_equals_the_policy(run_dir, tmp_path, policy):
    out = tmp_path / policy
    assert cli.main(["export", str(run_dir), "--policy", policy, "--out", str(out)]) == 0
    manifest = verify_export(out)
    assert manifest["policy"] == policy and "config.json" in manifest["files"]
    p = subprocess.run([sys.executable, "-c", _LOAD, str(out)], capture_output=True, text=True, timeout=300,
                       cwd=str(tmp_path))  # not the repository: no `erpd` on the path
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout)
    want = _logits_in_erpd(run_dir, policy, got["ids"])
    torch.testing.assert_close(torch.tensor(got["logits"]), want, rtol=1e-5, atol=1e-5)
    if policy != "base":  # the trained weights are there, not the base's
        base = _logits_in_erpd(run_dir, "base", got["ids"])
        assert not torch.allclose(want, base, atol=1e-4)


def test_export_errors(run_dir, tmp_path, capsys):
    assert cli.main(["export", str(tmp_path / "nope"), "--policy", "student", "--out", str(tmp_path / "x")]) == 2
    assert "not an erpd run directory" in capsys.readouterr().err
    assert cli.main(["export", str(run_dir), "--policy", "control", "--out", str(tmp_path / "c")]) == 1
    assert "no saved control policy" in capsys.readouterr().err
    out = tmp_path / "s"
    assert cli.main(["export", str(run_dir), "--policy", "student", "--out", str(out)]) == 0
    w = out / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x10
    w.write_bytes(bytes(data))
    with pytest.raises(checked_io.CorruptFileError, match="model.safetensors: sha256 does not match"):
        verify_export(out)
