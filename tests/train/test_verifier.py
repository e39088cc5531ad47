import re
from fractions import Fraction

import pytest

from erpd.train import task
from erpd.train.models import char_tokenizer
from erpd.train.verifier import extract_answer, load_verifier, parse_number, verify


@pytest.mark.parametrize("response, expected", [
    ("Answer: 12", 12),
    ("Tom has 7 + 5 = 12 apples.", 12),
    ("The answer is $1,234.", 1234),
    ("first 3, then answer = -3.5 units", Fraction(-7, 2)),
    ("so \\boxed{7} and later 9", 7),
    ("I think 10. Final answer: **15**", 15),
    ("Answer: 12.0", 12),
    ("answer is \u22124", -4),
    ("Answer: 3/4", Fraction(3, 4)),
    ("Answer:12\nAnswer: 13", 13),
])
def test_extracts_the_final_number(response, expected):
    assert extract_answer(response) == expected


@pytest.mark.parametrize("response", [
    "", "Answer: twelve", "no numbers here", "version v2 only", "\\boxed{}", None, 12, b"Answer: 12",
])
def test_malformed_responses_score_zero(response):
    assert verify(response, 12) == 0.0


def test_exact_comparison():
    assert verify("Answer: 12", 12) == 1.0
    assert verify("Answer: 12", "12") == 1.0
    assert verify("Answer: 12.50", 12.5) == 1.0
    assert verify("Answer: 12.0001", 12) == 0.0
    assert verify("Answer: 1,2", 2) == 0.0  # "1,2" is not a thousands group: the answer is 1
    assert verify("Answer: 121", 12) == 0.0
    assert verify("x12 is it", 12) == 0.0  # a number glued to a word is not an answer
    assert verify("Answer: -3", 3) == 0.0


def test_bad_ground_truth_raises():
    with pytest.raises(ValueError, match="not a number"):
        verify("Answer: 1", "one")
    with pytest.raises(TypeError):
        verify("Answer: 1", True)


def test_parse_number():
    assert parse_number(" 1,000 ") == 1000
    assert parse_number("1/0") is None
    assert parse_number("1,00") is None
    assert parse_number("12 apples") is None


def test_load_verifier():
    assert load_verifier("erpd.train.verifier.verify") is verify
    with pytest.raises(ValueError, match="dotted path"):
        load_verifier("verify")
    with pytest.raises(ValueError, match="cannot import"):
        load_verifier("erpd.train.verifier.nope")
    with pytest.raises(TypeError, match="not callable"):
        load_verifier("erpd.train.verifier.FRACTION_NOT_THERE".replace("FRACTION_NOT_THERE", "_NUMBER"))


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, [1, 3]])
def test_task_is_seeded_split_and_self_consistent(difficulty):
    train, held, _ = task.make_splits(3, 40, 20, difficulty)
    assert (train, held) == task.make_splits(3, 40, 20, difficulty)[:2]
    assert task.make_splits(4, 40, 20, difficulty)[0] != train
    assert not {p.question for p in train} & {p.question for p in held}
    assert len({p.question for p in train}) == 40
    levels = {difficulty} if isinstance(difficulty, int) else set(difficulty)
    for p in train + held:
        assert p.level in levels and p.answer >= 0
        assert str(p.answer) not in re.findall(r"\d+", p.question)  # repeating the question never scores
        assert verify(f"Answer: {p.answer}", p.answer) == 1.0


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_other_phrasings_share_no_template_name_or_object(difficulty):
    """The "other phrasings" split: same levels, number ranges and answer rule as the task, but
    none of the task generator's sentence templates, names or objects."""
    train, held, other = task.make_splits(5, 40, 40, difficulty, n_other=60)
    assert other == task.make_splits(5, 40, 40, difficulty, n_other=60)[2] and len({p.question for p in other}) == 60
    words = lambda ps: {w.strip(".?,") for p in ps for w in p.question.split()}  # noqa: E731
    task_words = words(task.generate(400, 11, difficulty))
    assert not (set(task._NAMES) | set(task._OBJECTS)) & words(other)
    assert not (set(task._OTHER_NAMES) | set(task._OTHER_OBJECTS)) & task_words
    # The task's own story verbs never appear in the other split's sentences.
    assert not {"gets", "gives", "shares", "buys"} & words(other)
    hi = {1: 9, 2: 21, 3: 81, 4: 81}[difficulty]
    for p in other:
        nums = [int(x) for x in re.findall(r"\d+", p.question)]
        assert p.level == difficulty and 0 < p.answer <= hi + 20 and max(nums) <= max(hi, 81)
        assert str(p.answer) not in [str(n) for n in nums]
        assert verify(f"Answer: {p.answer}", p.answer) == 1.0
    with pytest.raises(ValueError, match="phrasing"):
        task.generate(1, 0, 1, phrasing="pirate")


def test_task_answers_follow_the_story():
    # Recompute each level's answer from the numbers in the question.
    import re
    for p in task.generate(80, 0, [1, 2, 3, 4]):
        a = [int(x) for x in re.findall(r"\d+", p.question)]
        q = p.question
        if "gets" in q:
            want = a[0] + a[1]
        elif "bags" in q:
            want = a[0] * a[1] - a[2]
        elif "packs" in q:
            want = a[0] + a[1] * a[2]
        elif "gives away" in q:
            want = a[0] - a[1]
        elif "boxes" in q:
            want = a[0] * a[1]
        else:
            want = a[0] // a[1]
        assert p.answer == want, q


def test_bad_difficulty():
    with pytest.raises(ValueError, match="difficulty"):
        task.generate(3, 0, 5)


def test_chat_prompt():
    tok = char_tokenizer()
    text = task.chat_prompt(tok, "What is 2 + 2?")
    assert "What is 2 + 2?" in text and task.SYSTEM_PROMPT in text and text.endswith("assistant\n")
