"""The built-in task: arithmetic word problems with exact integer answers.

Problems are generated, not downloaded: a seeded generator draws a story template, names,
objects and numbers, so ``make_splits(seed, ...)`` gives the same train and held-out prompts on
every machine. Difficulty levels:

==========  =============================================================  ===========
level       problem                                                        example
==========  =============================================================  ===========
1           one addition or subtraction, single-digit numbers              7 + 5
2           one addition or subtraction, numbers 2..20                     17 − 9
3           one multiplication or exact division, small factors            4 × 6
4           two steps mixing the above                                     (3 × 4) − 5
==========  =============================================================  ===========

``difficulty`` may also be a list, e.g. ``[1, 2]``: each problem draws its level uniformly.
The held-out split never repeats a train question (checked on the text), and no answer
appears among its question's numbers (so repeating the question never scores).

Each problem becomes a chat prompt (the tokenizer's chat template) whose system message asks
for the final answer on a last line ``Answer: <number>``, the form ``erpd.train.verifier``
parses first.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

# One worked example: it doubles SmolLM2-135M-Instruct's sampled accuracy on level 1 (about 14%
# → 28% at temperature 0.5 over 64 problems) and shows the `Answer: N` form the verifier parses first.
SYSTEM_PROMPT = ("Solve the math problem in one short sentence, then write 'Answer: <number>'. Example: "
                 "'Tom has 3 apples. He gets 2 more. How many apples does Tom have now?' "
                 "Reply: 'Tom has 3 + 2 = 5 apples. Answer: 5'")

_NAMES = ["Tom", "Anna", "Sam", "Lily", "Ben", "Maya", "Leo", "Zoe", "Max", "Emma", "Noah", "Mia"]
_OBJECTS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "coins", "cards", "shells", "toys"]


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int
    level: int


def _pron(name: str) -> str:
    return "She" if name in {"Anna", "Lily", "Maya", "Zoe", "Emma", "Mia"} else "He"


def _add_sub(rng: random.Random, name: str, obj: str, hi: int, level: int) -> Problem:
    a, b = rng.randint(2, hi), rng.randint(2, hi)
    if rng.random() < 0.5:
        q = f"{name} has {a} {obj}. {_pron(name)} gets {b} more. How many {obj} does {name} have now?"
        return Problem(q, a + b, level)
    a, b = max(a, b) + 1, min(a, b)
    q = f"{name} has {a} {obj}. {_pron(name)} gives away {b}. How many {obj} does {name} have left?"
    return Problem(q, a - b, level)


def _level1(rng: random.Random, name: str, obj: str) -> Problem:
    return _add_sub(rng, name, obj, 8, 1)  # a subtraction's minuend is max + 1 <= 9


def _level2(rng: random.Random, name: str, obj: str) -> Problem:
    return _add_sub(rng, name, obj, 20, 2)


def _level3(rng: random.Random, name: str, obj: str) -> Problem:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    if rng.random() < 0.5:
        q = f"{name} has {a} boxes with {b} {obj} in each box. How many {obj} does {name} have in total?"
        return Problem(q, a * b, 3)
    q = f"{name} shares {a * b} {obj} equally among {b} friends. How many {obj} does each friend get?"
    return Problem(q, a, 3)


def _level4(rng: random.Random, name: str, obj: str) -> Problem:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    c = rng.randint(1, a * b - 1)
    if rng.random() < 0.5:
        q = (f"{name} has {a} bags with {b} {obj} in each bag. {_pron(name)} gives away {c}. "
             f"How many {obj} does {name} have left?")
        return Problem(q, a * b - c, 4)
    c = rng.randint(2, 20)
    q = (f"{name} has {c} {obj} and buys {a} packs with {b} {obj} in each pack. "
         f"How many {obj} does {name} have now?")
    return Problem(q, c + a * b, 4)


_LEVELS = {1: _level1, 2: _level2, 3: _level3, 4: _level4}


def _levels(difficulty) -> list[int]:
    levels = [difficulty] if isinstance(difficulty, int) else list(difficulty)
    bad = [x for x in levels if x not in _LEVELS]
    if not levels or bad:
        raise ValueError(f"difficulty must be one of {sorted(_LEVELS)} or a non-empty list of them, got {difficulty!r}")
    return levels


def generate(n: int, seed: int, difficulty=1, exclude: set[str] | frozenset = frozenset()) -> list[Problem]:
    """``n`` distinct problems (distinct question texts, none in ``exclude``), reproducible from ``seed``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    levels = _levels(difficulty)
    rng = random.Random(seed)
    out, seen = [], set(exclude)
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct problems at difficulty {difficulty!r}; ask for fewer")
        p = _LEVELS[rng.choice(levels)](rng, rng.choice(_NAMES), rng.choice(_OBJECTS))
        # An answer that also appears in the question would be "found" by any response that
        # merely repeats the question's last number: reject such problems.
        if p.question not in seen and str(p.answer) not in re.findall(r"\d+", p.question):
            seen.add(p.question)
            out.append(p)
    return out


def make_splits(seed: int, n_train: int, n_heldout: int, difficulty=1) -> tuple[list[Problem], list[Problem]]:
    """Train and held-out problems from one seed; held-out questions never appear in train."""
    train = generate(n_train, seed, difficulty)
    heldout = generate(n_heldout, seed + 7919, difficulty, exclude={p.question for p in train})
    return train, heldout


def chat_prompt(tokenizer, question: str, system_prompt: str | None = SYSTEM_PROMPT) -> str:
    """The prompt text for an instruct model: its chat template with a generation prompt."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": question}
    ]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # A base model without a template: a plain question/answer frame.
    head = f"{system_prompt}\n\n" if system_prompt else ""
    return f"{head}Question: {question}\nReply:"
