"""The measuring instruments themselves: if these drift, every table in benchmarks/results/ lies."""

from __future__ import annotations

import pytest
import torch

from erpd import _bench
from erpd.testing.shapes import by_name

from benchmarks import _harness

_MB = 2**20


def known_allocation_case(mb: int = 64, fail: bool = False) -> _bench.Case:
    """fwd+bwd touches exactly `mb` MB that it frees again; fwd allocates nothing."""
    if fail:
        raise RuntimeError("factory failed on purpose")

    def fwd_bwd():
        t = torch.ones(mb * _MB // 4)  # ones, not empty: untouched pages are never resident
        return {"x": t[:4].clone()}

    return _bench.Case(fwd=lambda: {}, fwd_bwd=fwd_bwd)


def test_failures_come_back_as_errors():
    res = _bench.measure("benchmarks.test_harness:known_allocation_case", {"fail": True})
    assert res["error"].startswith("setup: RuntimeError: factory failed on purpose")


def test_subprocess_sees_a_known_allocation():
    # In a fresh child (as the tables are made), not in this long-lived pytest process whose
    # allocator state depends on which tests ran before.
    res = _bench.measure_in_subprocess(
        "benchmarks.test_harness:known_allocation_case", {"mb": 64}, warmup=1, repeats=2, timeout_s=300
    )
    assert "error" not in res, res
    # The warm-up did the same allocation: its peak must not count, the measured call's must.
    assert 60 * _MB <= res["peak_extra_bytes"] <= 72 * _MB, res["peak_extra_bytes"] / _MB
    assert len(res["times"]["fwd"]) == len(res["times"]["fwd+bwd"]) == 2
    # Outputs must survive the pipe after the child has exited.
    assert res["outputs"]["x"].tolist() == [1.0] * 4
    tiny = by_name("tiny")
    res["outputs"] = {"logprobs": res["outputs"]["x"]}
    rows = [
        _harness.Row(tiny, "naive", res),
        _harness.Row(tiny, "erpd-cpu", {"skipped": "not built"}),
        _harness.Row(tiny, "matmul-floor", {"times": {"fwd": [1.0], "fwd+bwd": [4.0]}, "peak_extra_bytes": 0}),
    ]
    text = _harness.render(rows, title="t", env={"device": "x"})
    assert "| tiny (N=16, H=32, V=128) | naive |" in text
    assert "skipped [1]" in text and "[1] erpd-cpu on tiny: not built" in text
    assert "| 1.00× |" in text  # naive against itself


def test_quantiles():
    assert _bench.quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert _bench.quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.2) == 1.8
    s = _bench.summarize([3.0])
    assert s["median"] == s["p20"] == s["p80"] == 3.0


@pytest.mark.slow  # every op and provider, each in a fresh process
def test_suite_runner_writes_table_rows_and_plot(tmp_path):
    """`python -m benchmarks.run` end to end on the smallest shape: every op's table, CSV rows
    whose ratios agree with the raw samples, and a plot."""
    import csv
    import importlib.util
    import json

    from benchmarks import run

    rc = run.main(["--suite", "cpu", "--shapes", "tiny", "--repeats", "1", "--rounds", "1", "--ops", "linear_logprobs,linear_policy_loss",
                   "--providers", "naive,erpd-cpu,matmul-floor", "--out-dir", str(tmp_path), "--label", "smoke"])
    assert rc == 0
    for op, coef in (("linear_logprobs", 8), ("linear_policy_loss", 6)):
        stem = tmp_path / f"cpu-{op}-smoke"
        assert "| tiny (N=16, H=32, V=128) |" in stem.with_suffix(".md").read_text()
        assert stem.with_suffix(".png").stat().st_size > 0 or not importlib.util.find_spec("matplotlib")
        rows = {(r["provider"], r["mode"]): r for r in csv.DictReader(stem.with_suffix(".csv").open())}
        raw = {r["provider"]: r for r in json.loads(stem.with_suffix(".json").read_text())["rows"]}
        for prov in ("naive", "erpd-cpu", "matmul-floor"):
            if "times" not in raw[prov]:
                continue  # e.g. the extension is not built here: the table says why
            r = rows[(prov, "fwd+bwd")]
            ms = _bench.summarize(raw[prov]["times"]["fwd+bwd"])["median"]
            assert abs(float(r["median_ms"]) - ms) <= 1e-3 * ms + 1e-4
            assert r["op"] == op and r["dtype"] == "fp32" and r["commit"] and r["date"]
            assert abs(float(r["tflops"]) - round(coef * 16 * 32 * 128 / ms / 1e9, 2)) <= 0.011
        floor = float(rows[("matmul-floor", "fwd+bwd")]["median_ms"])
        assert abs(float(rows[("naive", "fwd+bwd")]["x_floor"]) - float(rows[("naive", "fwd+bwd")]["median_ms"]) / floor) < 2e-3 * float(rows[("naive", "fwd+bwd")]["x_floor"]) + 1e-3


def _rounds(per_round: list[list[float]], first_id: int = 0) -> dict:
    """A harness result pooled over rounds, as `_harness.run` leaves it."""
    return {
        "times": {"fwd+bwd": [x for r in per_round for x in r]},
        "round_ids": list(range(first_id, first_id + len(per_round))),
        "round_sizes": {"fwd+bwd": [len(r) for r in per_round]},
        "peak_extra_bytes": 0,
    }


def test_ratio_interval_pairs_rounds():
    # Every round of `op` takes exactly twice its floor, while the rounds themselves drift by 3x:
    # resampling rounds in pairs keeps the ratio at 2, unpaired resampling would not.
    floor = [[10.0 * (1 + r % 3)] * 3 for r in range(8)]
    op = [[2 * x for x in r] for r in floor]
    lo, hi = _bench.ratio_interval(_rounds(op), _rounds(floor), "fwd+bwd")
    assert lo == hi == 2.0
    # Noisy rounds: the interval is proper and holds the point estimate.
    rng = __import__("random").Random(1)
    op = [[x * rng.uniform(1.0, 1.2) for x in r] for r in floor]
    lo, hi = _bench.ratio_interval(_rounds(op), _rounds(floor), "fwd+bwd")
    point = _bench.summarize(_rounds(op)["times"]["fwd+bwd"])["median"] / _bench.summarize(_rounds(floor)["times"]["fwd+bwd"])["median"]
    assert 1.0 <= lo < point < hi <= 1.2


def test_ratio_interval_needs_enough_common_rounds():
    floor = [[10.0]] * 6
    assert _bench.ratio_interval(_rounds([[20.0]] * 4), _rounds([[10.0]] * 4), "fwd+bwd") is None
    # Six rounds each, but a round that failed on one side shifts the ids: four in common.
    assert _bench.ratio_interval(_rounds([[20.0]] * 6, first_id=2), _rounds(floor), "fwd+bwd") is None
    assert _bench.ratio_interval(_rounds([[20.0]] * 6), _rounds(floor), "fwd+bwd") == (2.0, 2.0)
    # Samples that do not add up to the recorded rounds: no interval rather than a wrong one.
    bad = _rounds([[20.0]] * 6)
    bad["times"]["fwd+bwd"].append(1.0)
    assert _bench.ratio_interval(bad, _rounds(floor), "fwd+bwd") is None


def test_render_shows_the_interval():
    tiny = by_name("tiny")
    floor = [[10.0, 11.0]] * 6
    rows = [
        _harness.Row(tiny, "erpd-cpu", _rounds([[20.0, 22.0]] * 6)),
        _harness.Row(tiny, "matmul-floor", _rounds(floor)),
    ]
    text = _harness.render(rows, title="t", env={"device": "x"})
    assert "| 2.00× (2.00–2.00) |" in text
    assert "| 1.00× |" in text  # the floor against itself: no interval


def test_gemm_breakdown_accounts_for_the_wall(capsys):
    from benchmarks import gemm_breakdown

    assert gemm_breakdown.main(["--op", "linear_policy_loss", "--shape", "tiny", "--calls", "2"]) == 0
    text = capsys.readouterr().out
    for provider in ("erpd-cpu", "matmul-floor"):
        rows = {line.split(" | ")[1]: float(line.rsplit("|", 2)[1].replace(",", "")) for line in text.splitlines()
                if line.startswith(f"| {provider} |")}
        gemms = [ms for k, ms in rows.items() if k.startswith("`aten::")]
        # The floor is 3 GEMMs (logits, dh, dW); every provider's wall is its GEMMs plus a rest >= 0.
        assert len(gemms) >= 3 if provider == "erpd-cpu" else len(gemms) == 3, text
        rounding = 0.05 * (len(gemms) + 2)  # every cell is rounded to 0.1 ms
        assert abs(rows["GEMMs in all"] - sum(gemms)) <= rounding and rows["the rest (wall − GEMMs)"] >= 0, text
        assert abs(rows["wall"] - rows["GEMMs in all"] - rows["the rest (wall − GEMMs)"]) <= rounding, text


def test_gemm_breakdown_counts_a_missing_shape_as_zero():
    from benchmarks import gemm_breakdown

    res = {"p": {"wall": [10.0, 12.0, 14.0], "gemms": {"aten::mm [a]": [4.0, 0.0, 6.0]}}}
    text = gemm_breakdown.render("op", "tiny", res)
    assert "| p | `aten::mm [a]` | 4.0 |" in text and "| p | the rest (wall − GEMMs) | 8.0 |" in text


def test_gemm_breakdown_counts_a_nested_gemm_once():
    from types import SimpleNamespace as Ev

    from benchmarks.gemm_breakdown import _inside_gemm

    outer = Ev(name="aten::addmm", cpu_parent=Ev(name="erpd::linear_kl_fwd_with_grads", cpu_parent=None))
    inner = Ev(name="aten::mm", cpu_parent=Ev(name="aten::matmul", cpu_parent=outer))
    assert not _inside_gemm(outer) and _inside_gemm(inner)
