"""Evaluation: multiple-choice accuracy by log-likelihood, knowledge retention, pair metrics.

MC scoring: each choice is scored as the complete assistant answer to the question (chat template,
end-of-turn included): sum of its token log-probs. `accuracy` (primary) picks the choice with the
highest summed log-likelihood, as TruthfulQA MC1 and lm-eval-harness `acc` do; `accuracy_norm`
divides by the choice's token count first (favours long answers less than `accuracy` favours
short ones). Both are reported.
"""

from __future__ import annotations

import csv
import importlib.resources
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from foundation.model import CausalLM
from foundation.train_config import TrainConfig
from worker.training.data import EncodedPair, encode_prompt, encode_response
from worker.training.logprobs import base_anchor, pair_logratios, score_sequences
from worker.training.loss import bapo_loss

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MC_MAX_PROMPT_TOKENS = 1024
MC_MAX_CHOICE_TOKENS = 256


class MCFormatError(ValueError):
    """A multiple-choice file is unreadable or in none of the known formats."""


@dataclass(frozen=True)
class MCQuestion:
    """One multiple-choice question with the index of its correct choice."""

    question: str
    choices: tuple[str, ...]
    answer_index: int


@dataclass(frozen=True)
class MCResult:
    """Accuracy (primary: summed log-likelihood), its standard error, the normalised variant, n."""

    accuracy: float
    stderr: float
    accuracy_norm: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"accuracy": self.accuracy, "stderr": self.stderr,
                "accuracy_norm": self.accuracy_norm, "n": self.n}  # fmt: skip


def general_mc_path() -> Path:
    """The general-knowledge MC set shipped with the engine (ARC jsonl format)."""
    resource = importlib.resources.files("worker.training.resources") / "general_mc.jsonl"
    return Path(str(resource))


def load_mc(path: Path) -> list[MCQuestion]:
    """Load ARC jsonl, MMLU csv or TruthfulQA mc_task.json (MC1), detected from the content."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MCFormatError(f"cannot read {path}: {exc}") from exc
    stripped = text.lstrip()
    if not stripped:
        raise MCFormatError(f"{path}: no questions")
    if stripped.startswith("["):
        questions = _truthfulqa(path, text)
    elif stripped.startswith("{"):
        questions = _arc_jsonl(path, text)
    else:
        questions = _mmlu_csv(path, text)
    if not questions:
        raise MCFormatError(f"{path}: no questions")
    return questions


def _arc_jsonl(path: Path, text: str) -> list[MCQuestion]:
    """ARC: one {"question", "choices": {"text", "label"}, "answerKey"} per line."""
    questions = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            labels, texts = list(row["choices"]["label"]), list(row["choices"]["text"])
            answer = labels.index(row["answerKey"])
            question = MCQuestion(str(row["question"]), tuple(texts), answer)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise MCFormatError(f"{path}:{number}: not an ARC record ({exc})") from exc
        questions.append(_checked(question, f"{path}:{number}"))
    return questions


def _mmlu_csv(path: Path, text: str) -> list[MCQuestion]:
    """MMLU: header question,choice0..choice3,answer (answer an integer index)."""
    reader = csv.DictReader(text.splitlines())
    expected = {"question", "choice0", "choice1", "choice2", "choice3", "answer"}
    if not reader.fieldnames or not expected <= set(reader.fieldnames):
        raise MCFormatError(f"{path}: not ARC jsonl, MMLU csv or TruthfulQA json")
    questions = []
    for number, row in enumerate(reader, start=2):
        try:
            choices = tuple(row[f"choice{i}"] for i in range(4))
            question = MCQuestion(row["question"], choices, int(row["answer"]))
        except (TypeError, ValueError) as exc:
            raise MCFormatError(f"{path}:{number}: bad MMLU row ({exc})") from exc
        questions.append(_checked(question, f"{path}:{number}"))
    return questions


def _truthfulqa(path: Path, text: str) -> list[MCQuestion]:
    """TruthfulQA mc_task.json: a list of {"question", "mc1_targets": {answer: 0|1}}."""
    try:
        rows = json.loads(text)
        parsed = [(str(r["question"]), dict(r["mc1_targets"])) for r in rows]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise MCFormatError(f"{path}: not a TruthfulQA mc_task.json ({exc})") from exc
    questions = []
    for number, (question, targets) in enumerate(parsed, start=1):
        correct = [i for i, label in enumerate(targets.values()) if label == 1]
        if len(correct) != 1:
            raise MCFormatError(f"{path}: question {number} has {len(correct)} correct MC1 answers")
        questions.append(_checked(MCQuestion(question, tuple(targets), correct[0]), f"#{number}"))
    return questions


def _checked(question: MCQuestion, where: str) -> MCQuestion:
    """Refuse questions with fewer than two choices or an answer index out of range."""
    if len(question.choices) < 2 or not 0 <= question.answer_index < len(question.choices):
        raise MCFormatError(f"{where}: needs >= 2 choices and a valid answer")
    return question


def mc_accuracy(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[MCQuestion],
    limit: int | None = None,
    batch_size: int = 16,
) -> MCResult:
    """Log-likelihood MC accuracy of `model` on the first `limit` questions."""
    questions = questions[:limit] if limit is not None else questions
    hits, hits_norm = mc_hits(model, tokenizer, questions, batch_size)
    return _result(int(sum(hits)), int(sum(hits_norm)), len(questions))


def mc_hits(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[MCQuestion],
    batch_size: int = 16,
) -> tuple[list[float], list[float]]:
    """Per-question correctness (1.0/0.0) by summed and by length-normalised log-likelihood.

    The question is the user turn and each choice a complete assistant answer; the model's pick
    is the choice it gives the highest log-likelihood (the first on ties).
    """
    rows: list[tuple[list[int], list[int]]] = []
    spans: list[tuple[int, int]] = []
    for q in questions:
        messages = [{"role": "user", "content": q.question}]
        prompt = encode_prompt(tokenizer, messages, MC_MAX_PROMPT_TOKENS)
        spans.append((len(rows), len(q.choices)))
        for choice in q.choices:
            rows.append(
                (prompt, encode_response(tokenizer, messages, choice, MC_MAX_CHOICE_TOKENS))
            )
    scores = score_sequences(model, rows, tokenizer.pad_token_id, batch_size)
    hits: list[float] = []
    hits_norm: list[float] = []
    for q, (start, count) in zip(questions, spans, strict=True):
        raw = scores[start : start + count]
        norm = [s / len(rows[start + i][1]) for i, s in enumerate(raw)]
        hits.append(float(_argmax(raw) == q.answer_index))
        hits_norm.append(float(_argmax(norm) == q.answer_index))
    return hits, hits_norm


def _argmax(values: list[float]) -> int:
    """Index of the largest value (first on ties)."""
    return max(range(len(values)), key=values.__getitem__)


def _result(hits: int, hits_norm: int, n: int) -> MCResult:
    """Accuracies with the sample standard error sqrt(p(1-p)/(n-1))."""
    if n == 0:
        return MCResult(0.0, 0.0, 0.0, 0)
    p = hits / n
    stderr = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0
    return MCResult(p, stderr, hits_norm / n, n)


def knowledge_retention(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[MCQuestion],
    limit: int | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Adapter vs base MC accuracy (base = the PEFT model with its adapter disabled)."""
    adapter = mc_accuracy(model, tokenizer, questions, limit, batch_size)
    with model.disable_adapter():
        base = mc_accuracy(model, tokenizer, questions, limit, batch_size)
    return {"base": base.to_dict(), "adapter": adapter.to_dict(),
            "delta": adapter.accuracy - base.accuracy,
            "delta_norm": adapter.accuracy_norm - base.accuracy_norm}  # fmt: skip


def evaluate_adapter(
    model_path: Path,
    adapter_dir: Path | None,
    questions: list[MCQuestion],
    limit: int | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Load the base model (and adapter) and score MC: {"base", "adapter", "delta", "delta_norm"}.

    Without an adapter, "adapter" and the deltas are None.
    """
    from peft import PeftModel

    from foundation.model import load_model, load_tokenizer

    tokenizer, model = load_tokenizer(model_path), load_model(model_path)
    if adapter_dir is None:
        base = mc_accuracy(model, tokenizer, questions, limit, batch_size)
        return {"base": base.to_dict(), "adapter": None, "delta": None, "delta_norm": None}
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    return knowledge_retention(model, tokenizer, questions, limit, batch_size)


def retention_metrics(retention: dict[str, Any]) -> dict[str, float]:
    """Flat metrics from a knowledge_retention() result (for metrics.json and gates)."""
    return {
        "mc_base_accuracy": retention["base"]["accuracy"],
        "mc_adapter_accuracy": retention["adapter"]["accuracy"],
        "mc_retention_delta": retention["delta"],
        "mc_retention_delta_norm": retention["delta_norm"],
        "mc_questions": retention["adapter"]["n"],
    }


def pair_metrics(
    model: CausalLM, pairs: list[EncodedPair], config: TrainConfig, pad_token_id: int
) -> dict[str, float]:
    """Loss, preference accuracy/margin and (with base answers) base-anchor drift of `model`."""
    with_base = all(pair.base is not None for pair in pairs)  # DPO jobs have no base answers
    parts: list[tuple[torch.Tensor, ...]] = []
    with torch.no_grad():
        for start in range(0, len(pairs), config.score_batch_size):
            chunk = pairs[start : start + config.score_batch_size]
            h_w, h_l, h_b, _, _ = pair_logratios(
                model, chunk, pad_token_id, with_base, packed=config.packing
            )
            parts.append((h_w, h_l) if h_b is None else (h_w, h_l, h_b))
    h = [torch.cat(column) for column in zip(*parts, strict=True)]
    anchor = base_anchor(pairs, h[2]) if with_base else None
    metrics = bapo_loss(h[0], h[1], anchor, beta=config.beta,
                        anchor_weight=config.effective_anchor_weight,
                        anchor_form=config.anchor_form,
                        anchor_tolerance=config.anchor_tolerance).metrics  # fmt: skip
    return {name: float(value) for name, value in metrics.items()}
