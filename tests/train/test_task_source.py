"""Your own problems: task.source (a JSONL file, or a `datasets` dataset) and the math-verify
verifier, down to a tiny-model `erpd sample` run on the 20-problem file shipped in examples/."""

import importlib.util
import json
from pathlib import Path

import pytest

from erpd import cli
from erpd.train import data as D
from erpd.train import task, verifier
from erpd.train.config import TaskConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "math20.jsonl"
needs_math_verify = pytest.mark.skipif(importlib.util.find_spec("math_verify") is None,
                                       reason="math-verify is installed by requirements/test-clients.txt")


def _write(tmp_path, lines, name="p.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_the_example_file():
    problems = task.load_problems(str(EXAMPLE))
    assert len(problems) == 20 and all(p.level == 0 for p in problems)
    assert problems[6].answer == 7 and problems[14].answer == "\\frac{3}{4}"


def test_split_is_seeded_and_disjoint():
    problems = task.load_problems(str(EXAMPLE))
    train, heldout = task.split_problems(problems, seed=3, n_train=12, n_heldout=8)
    assert len(train) == 12 and len(heldout) == 8
    assert {p.question for p in train}.isdisjoint(p.question for p in heldout)
    assert task.split_problems(problems, 3, 12, 8) == (train, heldout)
    assert task.split_problems(problems, 4, 12, 8) != (train, heldout)
    with pytest.raises(ValueError, match=r"task.source has 20 problems; task.n_train \+ task.n_heldout = 16 \+ 8 needs more"):
        task.split_problems(problems, 0, 16, 8)


def test_problems_dispatches_on_source():
    generated = task.problems(TaskConfig(n_train=3, n_heldout=2))
    assert all(p.level == 1 for p in generated[0] + generated[1])
    mine = task.problems(TaskConfig(source=str(EXAMPLE), n_train=3, n_heldout=2))
    texts = {json.loads(line)["prompt"] for line in EXAMPLE.read_text().splitlines()}
    assert {p.question for p in mine[0] + mine[1]} <= texts


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a", "answer": 1}', '{"prompt": "b", "answer": 2', ''], r"p.jsonl: line 2 is not valid JSON"),
    (['{"prompt": "a", "answer": 1}', '', '{"question": "b", "answer": 2}'],
     r"p.jsonl: line 3 has no 'prompt' \(its keys: \['answer', 'question'\]"),
    (['{"prompt": "a", "answer": 1}', '{"prompt": "a", "answer": 2}'], r"p.jsonl: line 2 repeats the prompt of line 1"),
    (['{"prompt": "", "answer": 1}'], r"line 1: 'prompt' must be a non-empty string"),
    (['{"prompt": "a", "answer": null}'], r"line 1: 'answer' must be a number or a non-empty string"),
    (['{"prompt": "a", "answer": true}'], r"line 1: 'answer' must be a number or a non-empty string"),
    (['["a", 1]'], r"line 1 is not a JSON object"),
    ([''], r"p.jsonl: no problems"),
])
def test_bad_files_are_named(tmp_path, lines, message):
    with pytest.raises(ValueError, match=message):
        task.load_problems(_write(tmp_path, lines))


def test_missing_file_and_other_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match="task.source .*nope.jsonl' does not exist"):
        task.load_problems(str(tmp_path / "nope.jsonl"))
    path = _write(tmp_path, ['{"q": "What is 1 + 1?", "a": 2}'])
    assert task.load_problems(path, prompt_key="q", answer_key="a") == [task.Problem("What is 1 + 1?", 2, 0)]


def test_a_datasets_directory(tmp_path):
    pytest.importorskip("datasets", reason="the datasets package is not installed")
    (tmp_path / "ds").mkdir()
    _write(tmp_path / "ds", ['{"question": "What is 2 + 3?", "solution": "5"}',
                             '{"question": "What is 4 + 4?", "solution": "8"}'], name="train.jsonl")
    problems = task.load_problems(str(tmp_path / "ds"), prompt_key="question", answer_key="solution")
    assert [(p.question, p.answer) for p in problems] == [("What is 2 + 3?", "5"), ("What is 4 + 4?", "8")]


@needs_math_verify
@pytest.mark.parametrize("response, answer, reward", [
    ("7 + 5 = 12. Answer: 12", "12", 1.0),
    ("Answer: 13", 12, 0.0),
    ("So half and a quarter make \\boxed{\\frac{3}{4}}", "\\frac{3}{4}", 1.0),
    ("Answer: 0.75", "\\frac{3}{4}", 1.0),
    ("Answer: 3/4", "0.75", 1.0),
    ("x = 7", "7", 1.0),
    ("no idea", "7", 0.0),
    ("", "7", 0.0),
    (None, "7", 0.0),
])
def test_math_verify(response, answer, reward):
    assert verifier.math_verify(response, answer) == reward


@needs_math_verify
def test_math_verify_refuses_a_bad_ground_truth():
    with pytest.raises(ValueError, match="is not an expression math-verify can parse"):
        verifier.math_verify("Answer: 1", "")


def test_load_verifier_checks_what_it_needs(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else real(name, *a))
    with pytest.raises(ImportError, match=r"needs the math_verify package: pip install math-verify"):
        verifier.load_verifier("erpd.train.verifier.math_verify")


@needs_math_verify
def test_sample_a_tiny_model_on_the_example_file(tmp_path):
    out = tmp_path / "run"
    args = ["sample", "--out", str(out), "model.name=tiny", "model.train_layers=1", f"task.source={EXAMPLE}",
            "task.n_train=3", "task.n_heldout=2", "task.verifier=erpd.train.verifier.math_verify", "sample.k=2",
            "sample.max_new_tokens=4"]
    assert cli.main(args) == 0
    fixed = D.load(out / "data")
    prompts = {json.loads(line)["prompt"] for line in EXAMPLE.read_text().splitlines()}
    assert len(set(fixed.questions)) == 3 and set(fixed.questions) <= prompts
