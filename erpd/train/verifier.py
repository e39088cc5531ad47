"""Exact-answer verification for tasks whose answer is a number.

A verifier is any plain function ``verify(response: str, answer) -> float`` (reward in [0, 1]);
the trainer's config names one by dotted path (``task.verifier = "my_pkg.my_module.my_verify"``).
Two ship here: :func:`verify` (below, numbers only, no dependency) and :func:`math_verify`
(``task.verifier=erpd.train.verifier.math_verify``), HF's ``math-verify`` package (erpd's
``math`` extra): LaTeX and plain answers, fractions, radicals, sets and intervals compared
symbolically.

The built-in one parses the *final* number of a free-form response, in this order of trust:

1. the last ``\\boxed{...}`` (the convention of math-tuned models);
2. the last number right after an answer marker (``Answer: 12``, ``the answer is $12``,
   ``answer = -3.5``), which is the form the built-in task's prompt asks for;
3. otherwise the last number anywhere in the response (small instruct models often end with
   "... so Tom has 12 apples.").

Numbers may carry a sign (``-`` or the Unicode minus), thousands separators (``1,234``), a
decimal part (``12.0`` equals ``12``) or be a simple fraction (``3/4``). Comparison is exact
(rational arithmetic), never a float tolerance.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re
from fractions import Fraction
from typing import Callable

# A number not glued to a preceding word character or digit: "x2" and "v1.5" are not answers.
# Thousands groups must be exact ("1,234", not "1,23"), so "3,4" stays two numbers.
_NUMBER = r"[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?"
_NUM_RE = re.compile(rf"(?<![\w.]){_NUMBER}(?![\d])")
_MARKER_RE = re.compile(
    rf"(?:final\s+answer|answer)\s*(?:is|:|=|was)?\s*[:=]?\s*(?:\\\(|\$|\*\*)*\s*({_NUMBER})(?![\d])",
    re.IGNORECASE,
)
_BOXED_RE = re.compile(r"\\boxed\s*\{([^{}]*)\}")

Verifier = Callable[[str, object], float]


def parse_number(text: str) -> Fraction | None:
    """``"1,234.50"`` → Fraction(24690, 20); ``None`` when ``text`` is not one number."""
    if not isinstance(text, str):
        return None
    s = text.strip().replace("\u2212", "-").replace(" ", "")
    if not s:
        return None
    if not re.fullmatch(_NUMBER.replace(r"\s*", ""), s):
        return None
    s = s.replace(",", "")
    try:
        if "/" in s:
            num, den = s.split("/")
            return None if Fraction(den) == 0 else Fraction(num) / Fraction(den)
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(response: str) -> Fraction | None:
    """The final numeric answer of a free-form response, or ``None`` when there is none."""
    if not isinstance(response, str) or not response:
        return None
    boxed = _BOXED_RE.findall(response)
    if boxed:
        nums = _NUM_RE.findall(boxed[-1])
        return parse_number(nums[-1]) if nums else None
    marked = _MARKER_RE.findall(response)
    if marked:
        return parse_number(marked[-1])
    nums = _NUM_RE.findall(response)
    return parse_number(nums[-1]) if nums else None


def _as_fraction(answer) -> Fraction:
    if isinstance(answer, bool):
        raise TypeError("answer must be a number or a numeric string, got a bool")
    if isinstance(answer, (int, Fraction)):
        return Fraction(answer)
    if isinstance(answer, float):
        # Through its shortest repr: 0.1 means 1/10, not the binary double nearest to it.
        return Fraction(repr(answer))
    parsed = parse_number(str(answer))
    if parsed is None:
        raise ValueError(f"answer {answer!r} is not a number")
    return parsed


def verify(response: str, answer) -> float:
    """1.0 if the final number in ``response`` equals ``answer`` exactly, else 0.0.

    Malformed responses (no number, a non-string, an empty string) score 0.0; a malformed
    ``answer`` (the task's ground truth) raises, since it is a bug in the task, not the policy.
    """
    truth = _as_fraction(answer)
    got = extract_answer(response)
    return 1.0 if got is not None and got == truth else 0.0


@functools.lru_cache(maxsize=4096)
def _parse_gold(answer: str):
    import math_verify as mv

    gold = mv.parse(answer)
    if not gold:
        raise ValueError(f"answer {answer!r} is not an expression math-verify can parse")
    return gold


def math_verify(response: str, answer) -> float:
    """1.0 if ``math-verify`` finds the final answer of ``response`` (the last ``\\boxed{}``, else
    the last LaTeX or plain expression) equal to ``answer``, symbolically; else 0.0. Malformed
    responses score 0.0; a ground truth math-verify cannot parse raises ``ValueError``."""
    import math_verify as mv

    gold = _parse_gold(str(answer))
    if not isinstance(response, str) or not response.strip():
        return 0.0
    return 1.0 if mv.verify(gold, mv.parse(response)) else 0.0


# The packages a shipped verifier needs, checked when a run loads it (before any sampling).
math_verify.needs = ("math_verify", "pip install math-verify (or pip install -e .[math])")


def load_verifier(path: str) -> Verifier:
    """Import ``"package.module.function"`` and check that it is callable (and that the packages
    a shipped verifier needs are installed)."""
    if not isinstance(path, str) or "." not in path:
        raise ValueError(f"verifier must be a dotted path 'module.function', got {path!r}")
    module, _, name = path.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import verifier {path!r}: {e}") from e
    if not callable(fn):
        raise TypeError(f"verifier {path!r} is not callable")
    needs = getattr(fn, "needs", None)
    if needs is not None and importlib.util.find_spec(needs[0]) is None:
        raise ImportError(f"verifier {path!r} needs the {needs[0]} package: {needs[1]}")
    return fn
