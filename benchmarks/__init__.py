"""Benchmarks of the erpd ops: `python -m benchmarks.bench_<op>` from the repository root prints a
markdown table; `pytest benchmarks/` runs each case once as a smoke test (`--benchmark-enable`
times them)."""
