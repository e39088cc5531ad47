"""The measuring instruments themselves: if these drift, every table in benchmarks/results/ lies."""

from __future__ import annotations

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
