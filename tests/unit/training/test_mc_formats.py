"""Multiple-choice file loading (ARC jsonl, MMLU csv, TruthfulQA json) and the shipped set."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from worker.training.evaluate import MCFormatError, MCQuestion, general_mc_path, load_mc

SHARED_DATA = Path(__file__).resolve().parents[4] / "shared" / "data"


def test_arc_jsonl(tmp_path: Path) -> None:
    row = {"question": "Q?", "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]},
           "answerKey": "3"}  # fmt: skip
    path = tmp_path / "arc.jsonl"
    path.write_text(json.dumps(row) + "\n\n")
    assert load_mc(path) == [MCQuestion("Q?", ("x", "y", "z"), 2)]


def test_mmlu_csv(tmp_path: Path) -> None:
    path = tmp_path / "mmlu.csv"
    path.write_text('question,choice0,choice1,choice2,choice3,answer\n"A, b?",w,x,y,z,1\n')
    assert load_mc(path) == [MCQuestion("A, b?", ("w", "x", "y", "z"), 1)]


def test_truthfulqa_mc1(tmp_path: Path) -> None:
    rows = [{"question": "Q?", "mc1_targets": {"right": 1, "wrong": 0}, "mc2_targets": {}}]
    path = tmp_path / "mc_task.json"
    path.write_text(json.dumps(rows))
    assert load_mc(path) == [MCQuestion("Q?", ("right", "wrong"), 0)]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.jsonl", '{"question": "Q", "choices": {"text": ["a"], "label": ["A"]}, '
                    '"answerKey": "A"}\n', "2 choices"),
        ("b.jsonl", '{"question": "Q"}\n', r"b.jsonl:1: not an ARC record"),
        ("c.jsonl", '{"question": "Q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, '
                    '"answerKey": "C"}\n', "not an ARC record"),
        ("d.csv", "foo,bar\n1,2\n", "not ARC jsonl, MMLU csv or TruthfulQA json"),
        ("e.json", '[{"question": "Q", "mc1_targets": {"a": 1, "b": 1}}]', "2 correct"),
        ("f.jsonl", "", "no questions"),
    ],
)  # fmt: skip
def test_bad_files_are_refused(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(MCFormatError, match=message):
        load_mc(path)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MCFormatError, match="cannot read"):
        load_mc(tmp_path / "nope.jsonl")


def test_shipped_general_set() -> None:
    questions = load_mc(general_mc_path())
    assert len(questions) >= 300  # enough for the gate's paired comparison (README)
    assert len({q.question for q in questions}) == len(questions)
    assert all(len(set(q.choices)) == len(q.choices) in (3, 4) for q in questions)
    for size in (3, 4):  # the answer's position is balanced among questions with `size` choices
        positions = Counter(q.answer_index for q in questions if len(q.choices) == size)
        assert set(positions) == set(range(size))
        assert max(positions.values()) - min(positions.values()) <= 1
    lines = general_mc_path().read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [
        f"general-{i:03d}" for i in range(1, len(lines) + 1)
    ]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared evaluation data not present")
@pytest.mark.parametrize(
    "relative",
    ["arc/ARC-Easy-validation.jsonl", "truthfulqa/mc_task.json", "mmlu/test/anatomy_test.csv"],
)
def test_real_benchmark_files_load(relative: str) -> None:
    questions = load_mc(SHARED_DATA / relative)
    assert len(questions) > 50
