"""Readers for the shared evaluation data (../shared/data, formats in its README); seeded subsets.

Nothing here copies data into the repository: every reader takes the data folder at run time.
ARC, MMLU and TruthfulQA go through the engine's `load_mc`; PIQA and HellaSwag, which the engine
does not read, are turned into the engine's `MCQuestion` here.
"""

from __future__ import annotations

import bz2
import gzip
import json
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from foundation.pairs import Messages
from worker.training.evaluate import MCQuestion, load_mc

T = TypeVar("T")
DSP_DOMAINS: tuple[str, ...] = ("academy", "business", "entertainment", "literature")
DATA_DIR_ENV = "BAPO_EVAL_DATA"


class DataMissingError(FileNotFoundError):
    """A dataset file the benchmark needs is not in the data folder."""


def default_data_dir(repo_root: Path) -> Path:
    """$BAPO_EVAL_DATA, else ../shared/data relative to the repository."""
    configured = os.environ.get(DATA_DIR_ENV)
    return Path(configured) if configured else (repo_root.parent / "shared" / "data").resolve()


def seeded_sample(items: Sequence[T], n: int, seed: int, salt: str, skip: int = 0) -> list[T]:
    """items[skip : skip+n] of a shuffle seeded by (seed, salt): fixed, disjoint slices per salt."""
    order = list(range(len(items)))
    random.Random(f"{seed}:{salt}").shuffle(order)
    return [items[i] for i in order[skip : skip + n]]


def _require(path: Path) -> Path:
    """The path, or a DataMissingError naming it."""
    if not path.is_file():
        raise DataMissingError(f"missing dataset file: {path}")
    return path


# --- multiple choice --------------------------------------------------------------------------


@dataclass(frozen=True)
class MCSet:
    """A multiple-choice set: name, how to read it, and where it comes from."""

    name: str
    read: Callable[[Path], list[MCQuestion]]
    source: str


def read_piqa(data_dir: Path) -> list[MCQuestion]:
    """PIQA validation: goal → sol1 | sol2, labels in valid-labels.lst."""
    lines = _require(data_dir / "piqa" / "valid.jsonl").read_text("utf-8").splitlines()
    labels = _require(data_dir / "piqa" / "valid-labels.lst").read_text("utf-8").split()
    if len(lines) != len(labels):
        raise ValueError("piqa: valid.jsonl and valid-labels.lst differ in length")
    questions = []
    for line, label in zip(lines, labels, strict=True):
        row = json.loads(line)
        questions.append(MCQuestion(row["goal"], (row["sol1"], row["sol2"]), int(label)))
    return questions


def read_hellaswag(data_dir: Path) -> list[MCQuestion]:
    """HellaSwag validation (text form: context, gold index, four endings; 6 lines per task)."""
    path = _require(data_dir / "hellaswag" / "hellaswag_val_full.txt.bz2")
    lines = bz2.decompress(path.read_bytes()).decode("utf-8").splitlines()
    questions = []
    for start in range(0, len(lines) - 5, 6):
        context, gold, *endings = lines[start : start + 6]
        questions.append(MCQuestion(context, tuple(endings), int(gold)))
    return questions


def _engine_reader(*parts: str) -> Callable[[Path], list[MCQuestion]]:
    """A reader for a file the engine's load_mc understands (ARC jsonl, MMLU csv, TruthfulQA)."""
    return lambda data_dir: load_mc(_require(data_dir.joinpath(*parts)))


def mmlu_set(subject: str) -> MCSet:
    """One MMLU test subject."""
    return MCSet(f"mmlu_{subject}", _engine_reader("mmlu", "test", f"{subject}_test.csv"), "MMLU")


MC_SETS: dict[str, MCSet] = {
    s.name: s
    for s in (
        MCSet("arc_easy", _engine_reader("arc", "ARC-Easy-test.jsonl"), "ARC-Easy test"),
        MCSet("arc_challenge", _engine_reader("arc", "ARC-Challenge-test.jsonl"), "ARC-C test"),
        MCSet("truthfulqa_mc1", _engine_reader("truthfulqa", "mc_task.json"), "TruthfulQA MC1"),
        MCSet("piqa", read_piqa, "PIQA validation"),
        MCSet("hellaswag", read_hellaswag, "HellaSwag validation"),
    )
}


def mc_set(name: str) -> MCSet:
    """A registered set, or an MMLU subject named `mmlu_<subject>`."""
    if name in MC_SETS:
        return MC_SETS[name]
    if name.startswith("mmlu_"):
        return mmlu_set(name.removeprefix("mmlu_"))
    raise KeyError(f"unknown multiple-choice set {name!r}")


def chance_accuracy(questions: Sequence[MCQuestion]) -> float:
    """Expected accuracy of a uniform guess: mean of 1 / number of choices."""
    return sum(1 / len(q.choices) for q in questions) / max(1, len(questions))


# --- preference pairs -------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoredPair:
    """A general-alignment pair: the conversation and two candidate final assistant turns."""

    messages: Messages
    chosen: str
    rejected: str


_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh_transcript(text: str) -> tuple[Messages, str]:
    """Split an HH-RLHF transcript into chat turns and the final assistant turn."""
    parts = _TURN.split(text)
    turns = [
        {"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
        for speaker, content in zip(parts[1::2], parts[2::2], strict=True)
    ]
    if len(turns) < 2 or turns[-1]["role"] != "assistant" or turns[-2]["role"] != "user":
        raise ValueError("HH transcript does not end with a Human then an Assistant turn")
    return turns[:-1], turns[-1]["content"]


def read_hh_pairs(data_dir: Path, split: str) -> list[ScoredPair]:
    """HH-RLHF test pairs of one split ('helpful-base' or 'harmless-base'); odd ones skipped."""
    path = _require(data_dir / "hh-rlhf" / f"{split}-test.jsonl.gz")
    pairs = []
    for line in gzip.decompress(path.read_bytes()).decode("utf-8").splitlines():
        row = json.loads(line)
        try:
            messages, chosen = parse_hh_transcript(row["chosen"])
            rejected_messages, rejected = parse_hh_transcript(row["rejected"])
        except ValueError:
            continue
        usable = chosen.strip() and rejected.strip() and chosen != rejected
        if usable and messages == rejected_messages:
            pairs.append(ScoredPair(messages, chosen, rejected))
    return pairs


@dataclass(frozen=True)
class DSPRecord:
    """One DSP query with its response in each domain style (and the original Alpaca answer)."""

    query: str
    responses: dict[str, str]


def read_dsp(data_dir: Path) -> list[DSPRecord]:
    """DSP test records that have a non-empty response for every domain (CC BY-NC: eval only)."""
    path = _require(data_dir / "dsp" / "domain_specific_preference.test.json")
    records = []
    for row in json.loads(path.read_text("utf-8")):
        responses = {d: str(row["responses"].get(d) or "").strip() for d in DSP_DOMAINS}
        if all(responses.values()) and len(set(responses.values())) == len(DSP_DOMAINS):
            records.append(DSPRecord(str(row["query"]).strip(), responses))
    return records


def read_koala_prompts(data_dir: Path) -> list[str]:
    """The P-SOUPS (Koala) evaluation prompts."""
    path = _require(data_dir / "psoups-koala-eval" / "koala_eval_50.json")
    return [str(row["prompt"]).strip() for row in json.loads(path.read_text("utf-8"))]
