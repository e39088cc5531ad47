"""The policy losses' codes and statistic names: the one table every backend reads.

The kernels take the options ``method``, ``agg`` and ``kl_estimator`` as integer codes and return
their metrics as one float32 vector ``stats``. The codes and the order of ``stats`` are defined
here, once:

* Python reads this module (`erpd/ops/_validate.py` maps names to codes, `erpd/ops/policy_loss/`
  names the ``stats`` entries, `erpd/ops/_library.py` sizes them, `erpd/reference.py` lists the
  names);
* the Triton kernel (`kernels/policy_loss.py`) imports it;
* the C++ and CUDA code includes `csrc/policy_loss/codes.h`, which is generated from it::

      python -m erpd.ops.policy_spec --write-header

  (tests/ops/test_policy_spec.py fails when the committed header and this table differ).

The code of an entry is its position in its table. Each entry is (name, C++ enumerator[, note]).
This module imports nothing from erpd, so that any module (the reference included) can read it.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

# method= of policy_loss / linear_policy_loss
METHODS = (
    ("ppo", "kPPO"),
    ("sapo", "kSAPO"),
    ("cispo", "kCISPO"),
    ("gspo", "kGSPO"),
    ("reinforce", "kReinforce"),
)
# agg=
AGGS = (
    ("token-mean", "kTokenMean"),
    ("seq-mean-token-mean", "kSeqMeanTokenMean"),
    ("seq-mean-token-sum", "kSeqMeanTokenSum"),
    ("seq-mean-token-sum-norm", "kSeqMeanTokenSumNorm"),
)
# kl_estimator=
KL_ESTIMATORS = (
    ("k1", "kK1"),
    ("k2", "kK2"),
    ("k3", "kK3"),
)
# The op's `stats` output (float32 [NUM_STATS]), in this order. The metrics dict of the public ops
# holds every entry but inv_norm (kl_ref only with ref_logprobs, entropy only with an entropy).
STATS = (
    ("inv_norm", "kInvNorm", "1 / D: the backward scales the saved gradients by grad_output / D"),
    ("pg_loss", "kPgLoss", "the policy term of the loss"),
    ("clipfrac_low", "kClipfracLow", "fraction of valid tokens with A < 0 and r < lo"),
    ("clipfrac_high", "kClipfracHigh", "fraction of valid tokens with A > 0 and r > hi"),
    ("clipfrac", "kClipfrac", "clipfrac_low + clipfrac_high"),
    ("ratio_mean", "kRatioMean", "mean ratio over valid tokens"),
    ("ratio_min", "kRatioMin", "1 when there is no valid token"),
    ("ratio_max", "kRatioMax", "1 when there is no valid token"),
    ("approx_kl", "kApproxKL", "mean (r - 1) - log r of the token ratios"),
    ("kl_ref", "kKLRef", "mean KL term to the reference policy"),
    ("entropy", "kEntropy", "mean entropy"),
    ("num_valid", "kNumValid", "number of valid tokens"),
)

METHOD_CODES = {name: code for code, (name, *_) in enumerate(METHODS)}
AGG_CODES = {name: code for code, (name, *_) in enumerate(AGGS)}
KL_ESTIMATOR_CODES = {name: code for code, (name, *_) in enumerate(KL_ESTIMATORS)}
STAT_NAMES = tuple(name for name, *_ in STATS)
STAT_INDEX = {name: i for i, name in enumerate(STAT_NAMES)}
NUM_STATS = len(STATS)

HEADER = pathlib.Path(__file__).resolve().parents[2] / "csrc" / "policy_loss" / "codes.h"

# (enum, underlying type, table, the count's name, whether the count is the enum's last enumerator)
_ENUMS = (
    ("Method", "int64_t", METHODS, "kNumMethods", False),
    ("Agg", "int64_t", AGGS, "kNumAggs", False),
    ("KLEstimator", "int64_t", KL_ESTIMATORS, "kNumKLEstimators", False),
    ("Stat", "int", STATS, "kNumStats", True),
)


def render_header() -> str:
    """The text of csrc/policy_loss/codes.h."""
    out = [
        "// Generated from erpd/ops/policy_spec.py by `python -m erpd.ops.policy_spec --write-header`;",
        "// do not edit (tests/ops/test_policy_spec.py fails when this file and the table differ).",
        "// The integer codes of the policy losses' options and the order of their `stats` output.",
        "#pragma once",
        "",
        "#include <cstdint>",
        "",
        "namespace erpd {",
        "namespace policy {",
    ]
    for enum, ctype, table, count, count_in_enum in _ENUMS:
        out += ["", f"enum {enum} : {ctype} {{"]
        for code, (name, ident, *note) in enumerate(table):
            comment = f'"{name}"' + (f": {note[0]}" if note else "")
            out.append(f"  {ident} = {code},  // {comment}")
        if count_in_enum:
            out.append(f"  {count} = {len(table)}")
        out.append("};")
        if not count_in_enum:
            out.append(f"constexpr {ctype} {count} = {len(table)};")
    out += ["", "}  // namespace policy", "}  // namespace erpd", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m erpd.ops.policy_spec", description=__doc__.splitlines()[0])
    parser.add_argument("--write-header", action="store_true", help=f"write {HEADER.name} (else print it)")
    parser.add_argument("--header", type=pathlib.Path, default=HEADER, help="where to write it")
    args = parser.parse_args(argv)
    text = render_header()
    if not args.write_header:
        sys.stdout.write(text)
        return 0
    args.header.write_text(text)
    print(f"wrote {args.header}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
