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

Your own problems (``task.source``): :func:`load_problems` reads a JSONL file of
``{"prompt": ..., "answer": ...}`` objects (other key names with ``task.prompt_key`` /
``task.answer_key``), or opens ``task.source`` with ``datasets.load_dataset`` when it is not a
``.jsonl`` file (the ``datasets`` package must be installed); :func:`problems` shuffles them with
``task.seed`` into ``n_train`` train and ``n_heldout`` held-out problems.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

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
    answer: int | str  # a generated problem's integer; a user's answer as given (number or text)
    level: int  # 1..4 for generated problems, 0 for a user's


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

# The "other phrasings" split: the same levels and number ranges, told with sentence templates,
# names and objects that the generator above never uses, so that a policy which only fitted the
# training templates does not score on it (see ``make_splits``).
_OTHER_NAMES = ["Olivia", "Jack", "Sofia", "Ethan", "Grace", "Omar", "Priya", "Lucas", "Hana", "Diego", "Chloe", "Ravi"]
_OTHER_OBJECTS = ["oranges", "crayons", "balloons", "buttons", "eggs", "stamps", "rocks", "ribbons", "candles", "muffins"]
_OTHER_ADD = (
    "There are {a} {o} on the table. {n} puts {b} more {o} on the table. How many {o} are on the table now?",
    "{n} picked {a} {o} in the morning and {b} {o} in the afternoon. How many {o} did {n} pick altogether?",
    "One bag holds {a} {o} and a second bag holds {b} {o}. How many {o} are in the two bags together?",
    "A friend gave {n} {b} {o}. Before that, {n} owned {a} {o}. What is the total number of {o} {n} owns?",
)
_OTHER_SUB = (
    "{n} baked {a} {o} and ate {b} of them. How many {o} are left?",
    "There were {a} {o} in a jar. {n} took {b} {o} out of the jar. How many {o} remain in the jar?",
    "A shelf held {a} {o}. After {b} {o} were sold, how many {o} were still on the shelf?",
    "{n} needs {a} {o} but has only {b}. How many more {o} does {n} need?",
)
_OTHER_MUL = (
    "{n} fills {a} baskets and puts {b} {o} into every basket. How many {o} are in all the baskets?",
    "Each of {a} tables has {b} {o} on it. How many {o} are on the tables altogether?",
)
_OTHER_DIV = (
    "{n} splits {p} {o} into {b} equal groups. How many {o} are in each group?",
    "{p} {o} are packed {b} to a box. How many boxes are filled?",
)


def _other(rng: random.Random, level: int) -> Problem:
    name, obj = rng.choice(_OTHER_NAMES), rng.choice(_OTHER_OBJECTS)
    if level in (1, 2):
        hi = 8 if level == 1 else 20
        a, b = rng.randint(2, hi), rng.randint(2, hi)
        if rng.random() < 0.5:
            return Problem(rng.choice(_OTHER_ADD).format(n=name, o=obj, a=a, b=b), a + b, level)
        a, b = max(a, b) + 1, min(a, b)
        return Problem(rng.choice(_OTHER_SUB).format(n=name, o=obj, a=a, b=b), a - b, level)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    if level == 3:
        if rng.random() < 0.5:
            return Problem(rng.choice(_OTHER_MUL).format(n=name, o=obj, a=a, b=b), a * b, 3)
        return Problem(rng.choice(_OTHER_DIV).format(n=name, o=obj, p=a * b, b=b), a, 3)
    c = rng.randint(1, a * b - 1)
    q = rng.choice(_OTHER_MUL).format(n=name, o=obj, a=a, b=b)
    return Problem(q.rsplit(".", 1)[0] + f". Then {c} {obj} are taken away. How many {obj} are left?", a * b - c, 4)


def _levels(difficulty) -> list[int]:
    levels = [difficulty] if isinstance(difficulty, int) else list(difficulty)
    bad = [x for x in levels if x not in _LEVELS]
    if not levels or bad:
        raise ValueError(f"difficulty must be one of {sorted(_LEVELS)} or a non-empty list of them, got {difficulty!r}")
    return levels


def generate(n: int, seed: int, difficulty=1, exclude: set[str] | frozenset = frozenset(),
             phrasing: str = "task") -> list[Problem]:
    """``n`` distinct problems (distinct question texts, none in ``exclude``), reproducible from ``seed``.

    ``phrasing="task"``: the task's own templates, names and objects; ``"other"``: those of the
    "other phrasings" split, none of which the task's generator uses.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if phrasing not in ("task", "other"):
        raise ValueError(f"phrasing must be 'task' or 'other', got {phrasing!r}")
    levels = _levels(difficulty)
    rng = random.Random(seed)
    out, seen = [], set(exclude)
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct problems at difficulty {difficulty!r}; ask for fewer")
        level = rng.choice(levels)
        p = _other(rng, level) if phrasing == "other" else _LEVELS[level](rng, rng.choice(_NAMES), rng.choice(_OBJECTS))
        # An answer that also appears in the question would be "found" by any response that
        # merely repeats the question's last number: reject such problems.
        if p.question not in seen and str(p.answer) not in re.findall(r"\d+", p.question):
            seen.add(p.question)
            out.append(p)
    return out


def make_splits(seed: int, n_train: int, n_heldout: int, difficulty=1,
                n_other: int = 0) -> tuple[list[Problem], list[Problem], list[Problem]]:
    """Train, held-out and "other phrasings" problems from one seed.

    Held-out questions never appear in train; the other-phrasings problems share no template,
    name or object with either (same levels and number ranges).
    """
    train = generate(n_train, seed, difficulty)
    heldout = generate(n_heldout, seed + 7919, difficulty, exclude={p.question for p in train})
    other = generate(n_other, seed + 104729, difficulty, phrasing="other")
    return train, heldout, other


def _check_record(record, source: str, where: str, prompt_key: str, answer_key: str) -> Problem:
    if not isinstance(record, dict):
        raise ValueError(f"{source}: {where} is not a JSON object")
    for key in (prompt_key, answer_key):
        if key not in record:
            raise ValueError(f"{source}: {where} has no {key!r} (its keys: {sorted(record)}; set task.prompt_key / "
                             "task.answer_key for other names)")
    prompt, answer = record[prompt_key], record[answer_key]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{source}: {where}: {prompt_key!r} must be a non-empty string, got {prompt!r}")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or str(answer).strip() == "":
        raise ValueError(f"{source}: {where}: {answer_key!r} must be a number or a non-empty string, got {answer!r}")
    return Problem(prompt, answer, 0)


def load_problems(source: str, prompt_key: str = "prompt", answer_key: str = "answer",
                  split: str = "train") -> list[Problem]:
    """A user's problems: a ``.jsonl`` file (one JSON object per line, blank lines skipped), or what
    ``datasets.load_dataset(source, split=split)`` returns. Records must hold a non-empty string
    prompt and a number or string answer; a prompt may appear once. Errors name the file and line."""
    if source.endswith(".jsonl"):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"task.source {source!r} does not exist")
        records = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{source}: line {n} is not valid JSON ({e.msg})") from None
    else:
        try:
            import datasets
        except ImportError:
            raise ImportError(f"task.source {source!r} is not a .jsonl file; opening it with datasets.load_dataset "
                              "needs the `datasets` package (pip install datasets)") from None
        rows = datasets.load_dataset(source, split=split)
        records = [(f"row {i}", dict(r)) for i, r in enumerate(rows)]
    out, first = [], {}
    for where, record in records:
        p = _check_record(record, source, where, prompt_key, answer_key)
        if p.question in first:
            raise ValueError(f"{source}: {where} repeats the prompt of {first[p.question]}")
        first[p.question] = where
        out.append(p)
    if not out:
        raise ValueError(f"{source}: no problems")
    return out


def split_problems(problems: list[Problem], seed: int, n_train: int, n_heldout: int) -> tuple[list[Problem], list[Problem]]:
    """Shuffles ``problems`` with ``seed`` and takes ``n_train`` train then ``n_heldout`` held-out ones."""
    if n_train < 1 or n_heldout < 0:
        raise ValueError(f"need n_train >= 1 and n_heldout >= 0, got {n_train} and {n_heldout}")
    if n_train + n_heldout > len(problems):
        raise ValueError(f"task.source has {len(problems)} problems; task.n_train + task.n_heldout = "
                         f"{n_train} + {n_heldout} needs more")
    order = list(problems)
    random.Random(seed).shuffle(order)
    return order[:n_train], order[n_train:n_train + n_heldout]


def problems(task_config) -> tuple[list[Problem], list[Problem], list[Problem]]:
    """The run's train, held-out and other-phrasings problems: generated, or the user's
    (``task.source``: train and held-out only; there is no other-phrasings split to draw)."""
    c = task_config
    if c.source is None:
        return make_splits(c.seed, c.n_train, c.n_heldout, c.difficulty, c.n_other)
    train, heldout = split_problems(load_problems(c.source, c.prompt_key, c.answer_key, c.source_split), c.seed,
                                    c.n_train, c.n_heldout)
    return train, heldout, []


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
