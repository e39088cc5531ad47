"""`python -m erpd.compare` (the kernel comparison; `erpd demo` is the trainer's): it runs both
sides in fresh processes, prints the table, and exits 0 when the results agree."""

import pytest

from erpd import compare


@pytest.mark.slow  # both sides in fresh interpreters
def test_compare_smoke(capsys):
    assert compare.main(["--n", "24", "--h", "16", "--v", "257", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "erpd compare: linear_logprobs" in out
    assert "results agree" in out
