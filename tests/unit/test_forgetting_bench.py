"""The forgetting benchmark end to end at toy size, on a synthetic copy of the data formats.

Real components: the bundled model, the engine's train() and caches. The data is synthetic (same
file formats as ../shared/data) so the suite passes without the shared data folder.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench.forgetting import datasets, measures, report
from bench.forgetting.plan import Plan
from bench.forgetting.users import SliceSizes, dimension_users

REPO_ROOT = Path(__file__).resolve().parents[2]
DOMAINS = ("academy", "business", "entertainment", "literature")
TOPICS = (
    "rain",
    "bread",
    "bridges",
    "the moon",
    "bees",
    "glass",
    "tides",
    "maps",
    "salt",
    "clocks",
    "volcanoes",
    "paper",
    "wind",
    "copper",
    "owls",
    "ice",
)
ARC = [
    ("What is the largest planet in our solar system?", ["Mars", "Jupiter", "Venus"], 1),
    ("Which gas do plants take in to make food?", ["Oxygen", "Helium", "Carbon dioxide"], 2),
    ("What is frozen water called?", ["Ice", "Steam", "Sand"], 0),
]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _hh_line(question: str, chosen: str, rejected: str) -> str:
    prefix = f"\n\nHuman: {question}\n\nAssistant: "
    return json.dumps({"chosen": prefix + chosen, "rejected": prefix + rejected}) + "\n"


def make_data(root: Path) -> Path:
    """A tiny data folder in the shared data's formats (see ../shared/data/README.md)."""
    _write_jsonl(
        root / "arc" / "ARC-Easy-test.jsonl",
        [
            {
                "id": f"q{i}",
                "question": q,
                "answerKey": "ABC"[a],
                "choices": {"text": c, "label": ["A", "B", "C"]},
            }
            for i, (q, c, a) in enumerate(ARC)
        ],
    )
    _write_jsonl(
        root / "piqa" / "valid.jsonl",
        [
            {
                "goal": "To dry wet hands",
                "sol1": "rub them with a towel",
                "sol2": "dip them in a lake",
            },
            {
                "goal": "To cool hot soup",
                "sol1": "put it in the oven",
                "sol2": "let it stand a while",
            },
        ],
    )
    (root / "piqa" / "valid-labels.lst").write_text("0\n1\n", encoding="utf-8")
    hellaswag = (
        "A man is at a sink. he\n2\nflies away.\nsings to a cat.\nwashes his hands.\neats a car.\n"
    )
    (root / "hellaswag").mkdir()
    (root / "hellaswag" / "hellaswag_val_full.txt.bz2").write_bytes(
        bz2.compress(hellaswag.encode())
    )
    (root / "mmlu" / "test").mkdir(parents=True)
    with open(root / "mmlu" / "test" / "marketing_test.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
        writer.writerow(
            ["What does a brand logo help with?", "Recognition", "Rain", "Gravity", "Tides", 0]
        )
    (root / "truthfulqa").mkdir()
    (root / "truthfulqa" / "mc_task.json").write_text(
        json.dumps(
            [
                {
                    "question": "Can pigs fly?",
                    "mc1_targets": {"No, pigs cannot fly.": 1, "Yes.": 0},
                    "mc2_targets": {"No, pigs cannot fly.": 1, "Yes.": 0},
                }
            ]
        )
    )
    (root / "hh-rlhf").mkdir()
    for split in ("helpful-base", "harmless-base"):
        lines = [
            _hh_line(f"Tell me about {t}.", f"Sure: {t} is interesting.", "No.") for t in TOPICS
        ]
        (root / "hh-rlhf" / f"{split}-test.jsonl.gz").write_bytes(
            gzip.compress("".join(lines).encode())
        )
    (root / "dsp").mkdir()
    (root / "dsp" / "domain_specific_preference.test.json").write_text(
        json.dumps(
            [
                {
                    "query": f"Describe {t}.",
                    "responses": {
                        **{d: f"In the {d} manner: {t} matters." for d in DOMAINS},
                        "normal": t,
                    },
                }
                for t in TOPICS
            ]
        )
    )
    (root / "psoups-koala-eval").mkdir()
    (root / "psoups-koala-eval" / "koala_eval_50.json").write_text(
        json.dumps([{"id": str(i), "prompt": f"Why do {t} matter?"} for i, t in enumerate(TOPICS)])
    )
    return root


def tiny_plan() -> Plan:
    """One DSP user, DPO and BAPO, two steps, a few questions and pairs."""
    return Plan(
        mode="tiny",
        dsp_domains=("literature",),
        dimensions=(),
        sizes=SliceSizes(train=4, validation=2, test=2),
        steps=2,
        learning_rate=1e-3,
        default_lambda=1.0,
        sweep_lambdas=(),
        sweep_users=None,
        selected_on_all_users=False,
        mc_sets=(("arc_easy", 3), ("piqa", 2)),
        min_z_above_chance=-100.0,  # keep every set: too few questions to screen
        hh_pairs_per_split=2,
        gen_max_new_tokens=8,
        train_overrides={
            "max_prompt_tokens": 64,
            "max_response_tokens": 12,
            "base_max_new_tokens": 8,
            "lora_rank": 8,
        },
    )


@pytest.fixture(scope="module")
def model_path() -> Path:
    from worker.training.model import prepare_base_model

    return prepare_base_model(REPO_ROOT / "data")


def _finite(value: Any) -> bool:
    """Every number in a JSON-like value is finite."""
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def test_readers_parse_the_shared_formats(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data")
    for name, count in (
        ("arc_easy", 3),
        ("piqa", 2),
        ("hellaswag", 1),
        ("mmlu_marketing", 1),
        ("truthfulqa_mc1", 1),
    ):
        assert len(datasets.mc_set(name).read(data)) == count
    assert datasets.read_piqa(data)[1].answer_index == 1
    assert datasets.read_hellaswag(data)[0].choices[2] == "washes his hands."
    pair = datasets.read_hh_pairs(data, "helpful-base")[0]
    assert pair.messages == [{"role": "user", "content": "Tell me about rain."}]
    assert (pair.chosen, pair.rejected) == ("Sure: rain is interesting.", "No.")
    assert len(datasets.read_dsp(data)) == len(TOPICS)


@pytest.mark.slow
def test_mc_outcomes_match_the_engine(model_path: Path, tmp_path: Path) -> None:
    from bench.forgetting.measures import mc_outcomes
    from worker.training.evaluate import mc_accuracy
    from worker.training.model import load_model, load_tokenizer

    questions = datasets.mc_set("arc_easy").read(make_data(tmp_path / "data"))
    model, tokenizer = load_model(model_path), load_tokenizer(model_path)
    assert mc_outcomes(model, tokenizer, questions).result() == mc_accuracy(
        model, tokenizer, questions
    )


@pytest.mark.slow
def test_tiny_benchmark_end_to_end(model_path: Path, tmp_path: Path) -> None:
    from bench.forgetting.benchmark import run_benchmark

    out = tmp_path / "results" / "forgetting.json"
    result = run_benchmark(
        tiny_plan(),
        seed=0,
        data_dir=make_data(tmp_path / "data"),
        model_path=model_path,
        work_dir=tmp_path / "work",
        out_path=out,
        log=lambda message: None,
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result, default=str))
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| DPO | 1 |" in out.with_suffix(".md").read_text()
    assert result["status"] == "done" and _finite(result)
    assert [(r["user"], r["method_key"]) for r in result["runs"]] == [
        ("dsp:literature", "dpo"),
        ("dsp:literature", "bapo@1"),
    ]
    dpo, bapo = result["runs"]
    assert {
        k: v for k, v in dpo["train"]["config"].items() if k not in ("method", "anchor_weight")
    } == {k: v for k, v in bapo["train"]["config"].items() if k not in ("method", "anchor_weight")}
    for run in result["runs"]:
        assert run["train"]["steps"] == 2 and run["train"]["num_train_pairs"] == 4
        assert len(run["knowledge"]["arc_easy"]["hits"]) == 3
        assert run["preference"]["test"]["n"] == 2
    # the second run reused the first run's base responses and reference log-probs
    assert bapo["train"]["cache_stats"]["base_computed"] == 0
    assert bapo["train"]["cache_stats"]["ref_computed"] == 0
    assert set(result["summary"]) == {"dpo", "bapo@1"}
    assert result["selection"]["selected"] == 1.0
    assert result["goal"]["default"]["users"] == ["dsp:literature"]


def test_dimension_users_swap_poles_and_skip_identical_answers() -> None:
    prompts = [f"p{i}" for i in range(7)]
    answers = {
        "concise": [f"short {i}" for i in range(7)],
        "thorough": [f"long answer {i}" for i in range(6)] + ["short 6"],
    }
    sizes = SliceSizes(train=3, validation=1, test=2)
    concise, thorough = dimension_users(
        "informativeness", ("concise", "thorough"), prompts, answers, sizes
    )
    assert concise.facts["prompts_with_identical_answers_skipped"] == 1
    assert [len(concise.slices[s]) for s in ("train", "validation", "test")] == [3, 1, 2]
    first = concise.slices["train"][0]
    assert first.messages == [{"role": "user", "content": "p0"}]  # no instruction in training
    assert (first.chosen, first.rejected) == ("short 0", "long answer 0")
    assert (thorough.slices["train"][0].chosen, thorough.slices["train"][0].rejected) == (
        "long answer 0",
        "short 0",
    )
    assert (concise.rule, concise.rule_sign, thorough.rule_sign) == ("word_count", -1, 1)


def test_text_rules_order_obvious_cases() -> None:
    assert measures.word_count("one two three") == 3
    simple = "The sun is hot. It is big. We see it."
    technical = "Thermonuclear fusion predominantly synthesizes helium via proton-proton chains."
    assert measures.reading_grade(technical) > measures.reading_grade(simple)
    assert measures.friendliness("Great question, happy to help!") > measures.friendliness("No.")


def test_paired_change_uses_per_item_differences() -> None:
    change = measures.paired_change([1, 1, 0, 0], [1, 0, 0, 0])
    assert change["delta"] == -0.25
    assert change["stderr"] == pytest.approx(0.25)


def _run(user: str, key: str, pref: float, hits: str, val: float | None = None) -> dict[str, Any]:
    """A minimal run record, as runner.run_one writes it."""
    weight = 0.0 if key == "dpo" else float(key.split("@")[1])
    test = {
        "preference_accuracy": pref,
        "preference_accuracy_stderr": 0.05,
        "likelihood_accuracy": pref,
        "anchor_logratio": -1.0,
        "anchor_below_frac": 0.5,
    }
    validation = {"preference_accuracy": pref if val is None else val, "anchor_logratio": -1.0}
    return {
        "user": user, "method_key": key, "label": key, "anchor_weight": weight,
        "preference": {"test": test, "validation": validation},
        "knowledge": {"arc": {"hits": hits}, "pooled": {"delta": 0.0}},
        "alignment": {"pooled": {"delta": 0.0, "delta_stderr": 0.0}},
        "train_wall_s": 1.0, "eval_wall_s": 1.0,
    }  # fmt: skip


def test_lambda_selection_and_goal_check() -> None:
    base = {"arc": "1" * 20}
    runs = [
        _run("u", "dpo", 0.80, "0" * 6 + "1" * 14),  # loses 6 of 20
        _run("u", "bapo@0.1", 0.79, "0" + "1" * 19, val=0.80),  # loses 1: ratio 1/6
        _run("u", "bapo@1", 0.70, "1" * 20, val=0.70),  # below 95% of DPO on validation
    ]
    selection = report.select_lambda(runs, [0.1, 1.0])
    assert selection["selected"] == 0.1 and selection["eligible"] == [0.1]
    check = report.goal_check(runs, "bapo@0.1", base)
    assert check["dpo_knowledge_loss"] == pytest.approx(0.3)
    assert check["loss_ratio"] == pytest.approx(1 / 6)
    assert check["preference_ratio"] == pytest.approx(0.79 / 0.80)
    assert check["dpo_forgets_beyond_2se"] and check["met"]
    assert not report.goal_check(runs, "bapo@1", base)["met"]  # no loss, but too little preference
