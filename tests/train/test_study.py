"""``erpd study``: students and controls over seeds, weak teachers, pooled rows with CIs."""

import json

import pytest

from erpd import cli

from test_cli import TINY


def test_study_smoke(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="install requirements/demo.txt to run the CLI smoke test")
    out = tmp_path / "run"
    assert cli.main(["study", "--out", str(out), "--seeds", "2", "--weak", "mse", *TINY]) == 0
    printed = capsys.readouterr().out
    for row in ("| base |", "| teacher |", "| student |", "| control |", "| teacher (mse) |", "| student (mse) |",
                "| student − control |", "| student (mse) − base |"):
        assert row in printed, row
    assert "(seeds " in printed  # the pooled rows show their spread
    study = json.loads((out / "study.json").read_text())
    rows = {r["name"]: r for r in study["rows"]}
    assert len(rows["student"]["seeds"]["task"]) == 2 and len(rows["control"]["seeds"]["other"]) == 2
    for i in range(2):
        for f in ("eval/student.json", "eval/control.json", "student", "control/policy"):
            assert (out / "seeds" / f"s{i}" / f).exists(), (i, f)
        assert (out / "weak-mse" / "seeds" / f"s{i}" / "eval" / "student.json").is_file()
    cfgs = [json.loads((out / "seeds" / f"s{i}" / "config.json").read_text())["stage2"]["seed"] for i in range(2)]
    assert cfgs[0] != cfgs[1]
    assert (out / "study.png").stat().st_size > 1000
    # A second call finds everything done and only rewrites the table.
    mtime = (out / "seeds" / "s0" / "eval" / "student.json").stat().st_mtime
    assert cli.main(["study", "--out", str(out), "--seeds", "2", "--weak", "mse", *TINY]) == 0
    assert (out / "seeds" / "s0" / "eval" / "student.json").stat().st_mtime == mtime
