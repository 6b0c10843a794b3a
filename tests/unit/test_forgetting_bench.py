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
import os
from pathlib import Path
from typing import Any

import pytest

from bench.forgetting import datasets, measures, select
from bench.forgetting.plan import PLANS, Plan, Setting, bapo
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
    """One DSP user through all three phases: 2 DPO settings, 2 BAPO settings, 1 final seed."""
    return Plan(
        mode="tiny",
        dsp_domains=("literature",),
        dimensions=(),
        sizes=SliceSizes(train=4, validation=2, test=2),
        selection_users=("dsp:literature",),
        dpo_learning_rates=(1e-3, 3e-3),
        dpo_steps=(2,),
        bapo_grid=(bapo("hinge_per_token", 4.0), bapo("replay", 1.0)),
        selection_seeds=(0,),
        final_seeds=(0,),
        mc_sets=(("arc_easy", 2), ("piqa", 1)),
        selection_mc_fraction=0.5,
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
    from foundation.model import prepare_base_model

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
    from foundation.model import load_model, load_tokenizer
    from worker.training.evaluate import mc_accuracy

    questions = datasets.mc_set("arc_easy").read(make_data(tmp_path / "data"))
    model, tokenizer = load_model(model_path), load_tokenizer(model_path)
    assert mc_outcomes(model, tokenizer, questions).result() == mc_accuracy(
        model, tokenizer, questions
    )


@pytest.mark.slow
def test_tiny_benchmark_end_to_end_with_two_workers_and_resume(
    model_path: Path, tmp_path: Path
) -> None:
    from bench.forgetting import report
    from bench.forgetting.benchmark import run_benchmark, write_report
    from worker.training.judge import FLUENCY_RULE

    out = tmp_path / "results" / "forgetting.json"
    kwargs: dict[str, Any] = {
        "data_seed": 0, "data_dir": make_data(tmp_path / "data"), "model_path": model_path,
        "work_dir": tmp_path / "work", "out_path": out,
    }  # fmt: skip
    result = run_benchmark(tiny_plan(), log=lambda message: None, workers=2, **kwargs)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result, default=str))
    keys = [r["key"] for r in result["runs"]]
    assert len(keys) == len(set(keys)) == 6  # every run once, whoever trained it
    assert list((tmp_path / "work" / "claims").iterdir()) == []
    # both took runs: the child claims the second DPO run while the parent trains the first
    # (a run takes seconds, a claim microseconds)
    assert len({r["worker_pid"] for r in result["runs"]}) == 2
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "**Frontier**" in out.with_suffix(".md").read_text()
    assert result["status"] == "done" and _finite(result)
    phases = [r["phase"] for r in result["runs"]]
    assert phases == ["dpo_tuning"] * 2 + ["bapo_variants"] * 2 + ["final"] * 2
    tuned = result["selection"]["dpo"]["selected"]
    variants = [r for r in result["runs"] if r["phase"] == "bapo_variants"]
    for run in variants:  # BAPO runs at the tuned DPO's budget, varying only its anchor
        assert run["train"]["config"]["learning_rate"] == tuned["learning_rate"]
        assert run["train"]["steps"] == tuned["steps"]
    final = [r for r in result["runs"] if r["phase"] == "final"]
    assert {r["setting_key"] for r in final} == {
        result["selection"]["dpo"]["selected_key"],
        result["selection"]["default"]["selected_key"],
    }
    for run in result["runs"]:
        assert run["slice"] == ("test" if run["phase"] == "final" else "validation")
        assert len(run["answers"]) == 2 and len(run["persona"]["moves"]) == 2
        assert 0 <= run["fluency"]["degenerate_fraction"] <= 1
        assert ("alignment" in run) == (run["phase"] == "final")
    assert len(final[0]["knowledge"]["arc_easy"]["hits"]) == 2  # the final set ...
    assert len(variants[0]["knowledge"]["arc_easy"]["hits"]) == 1  # ... and the selection subset
    goal = result["goal"]
    assert {"movement_ratio", "knowledge_loss_ratio", "fluency_ok", "users", "seeds", "met"} <= set(
        goal
    )
    assert (goal["users"], goal["seeds"], goal["met"]) == (1, 1, False)  # too few users/seeds
    for run in result["runs"]:
        assert run["fluency"]["rule"] == FLUENCY_RULE
        assert len(run["fluency"]["tokens"]) == len(run["answer_ids"]) == 2
    readme = tmp_path / "README.md"  # the README block: plot, goal, final table, examples
    readme.write_text(f"# t\n\n{report.README_BEGIN}\nold\n{report.README_END}\n\n## next\n")
    write_report(out, readme=readme)
    block = readme.read_text()
    assert "old" not in block and block.endswith("## next\n")
    for part in ("(results/forgetting.png)", "Goal", "**Test**", "Example answers"):
        assert part in block, block
    assert block.count("| dsp:literature |") == 2, block  # two example prompts, one user
    # resume: drop the last run from the file; a second invocation trains only that one; a run
    # recorded under an older fluency rule (no rule, no token ids) is judged again from its text
    recorded = json.loads(out.read_text())
    recorded["runs"] = recorded["runs"][:-1]
    old = recorded["runs"][0]
    del old["answer_ids"], old["fluency"]["rule"]
    old["fluency"]["degenerate"] = [1, 1]
    out.write_text(json.dumps(recorded))
    log: list[str] = []
    again = run_benchmark(tiny_plan(), log=log.append, **kwargs)
    assert sum(line.startswith("run ") for line in log) == 1
    # the base measures came from the measure cache this time, and they are the same
    assert again["cache_entries_at_start"]["base_measures"] > 0
    assert again["base"] == result["base"]
    assert [r["key"] for r in again["runs"]] == [r["key"] for r in result["runs"]]
    rejudged = again["runs"][0]["fluency"]
    assert rejudged["rule"] == FLUENCY_RULE and "re-encoded" in rejudged["rejudged"]
    assert rejudged["degenerate"] == result["runs"][0]["fluency"]["degenerate"]
    assert rejudged["nll"] == pytest.approx(result["runs"][0]["fluency"]["nll"], abs=0.05)
    assert "rejudged" not in again["runs"][1]["fluency"]


def test_readme_forgetting_block_is_the_recorded_result() -> None:
    """README's block is what --report-only writes from bench/results/forgetting.json."""
    from bench.forgetting import report
    from bench.forgetting.benchmark import load_result

    result = load_result(REPO_ROOT / "bench/results/forgetting.json")
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    block = text[text.index(report.README_BEGIN) : text.index(report.README_END)]
    expected = report.readme_section(result, "bench/results/forgetting.png")
    assert block + report.README_END == expected, "run python -m bench.forgetting --report-only"
    recorded = json.loads((REPO_ROOT / "bench/results/forgetting.json").read_text("utf-8"))
    assert recorded["goal"] == result["goal"], "the recorded goal object is out of date"
    assert recorded["selection"] == result["selection"]
    with pytest.raises(ValueError, match=r"no .* block"):
        report.replace_block("# no block here\n", expected)


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


def _run(
    user: str,
    key: str,
    phase: str,
    movement: float,
    knowledge: float,
    degenerate: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """A minimal run record with the fields the selection rules read."""
    method = "dpo" if key.startswith("dpo") else "bapo"
    return {
        "user": user, "seed": seed, "phase": phase, "setting_key": key, "label": key,
        "setting": {"method": method, "learning_rate": 1e-3, "steps": 8},
        "persona": {"moves": [movement] * 4, "movement": movement, "win_rate": 1.0},
        "fluency": {"degenerate": [1] * degenerate + [0] * (4 - degenerate),
                    "base_degenerate": [0] * 4, "mean_nll": 2.0, "base_mean_nll": 2.0},
        "knowledge": {"pooled": {"delta": knowledge, "delta_stderr": 0.01}},
        "preference": {"anchor_logratio": 0.0, "preference_accuracy": 0.8},
    }  # fmt: skip


def test_dpo_tuning_skips_broken_text_and_the_default_follows_the_rule() -> None:
    runs = [
        _run("u", "dpo fast", "dpo_tuning", 0.9, -0.10, degenerate=2),  # moves most, but broken
        _run("u", "dpo mid", "dpo_tuning", 0.5, -0.06),
        _run("u", "dpo slow", "dpo_tuning", 0.1, 0.0),
        _run("u", "bapo strong", "bapo_variants", 0.2, 0.01),  # keeps, but moves < 0.8 × DPO
        _run("u", "bapo ok", "bapo_variants", 0.42, -0.01),  # moves 0.84 × DPO, loses 1/6
        _run("u", "bapo ok2", "bapo_variants", 0.45, -0.03),  # moves more, but loses more
    ]
    tuned = select.tune_dpo(runs)
    assert tuned["selected_key"] == "dpo mid"
    choice = select.choose_default(runs, "dpo mid")
    assert choice["selected_key"] == "bapo ok" and "0.8" in choice["why"]
    finals = [
        _run(u, key, "final", move, know, seed=seed)
        for u in (f"u{i}" for i in range(10))
        for seed in (0, 1)
        for key, move, know in (("dpo mid", 0.5, -0.06), ("bapo ok", 0.42, -0.01))
    ]
    goal = select.goal(finals, "dpo mid", "bapo ok")
    assert goal["movement_ratio"] == pytest.approx(0.84)
    assert goal["knowledge_loss_ratio"] == pytest.approx(1 / 6)
    assert goal["difference"]["knowledge_delta"] == pytest.approx(0.05)
    assert (goal["users"], goal["seeds"], goal["fluency_ok"], goal["dpo_forgets"]) == (
        10, 2, True, True,
    )  # fmt: skip
    assert goal["met"]
    assert not select.goal(finals[:4], "dpo mid", "bapo ok")["met"]  # 2 users only


def test_the_goal_names_a_user_whose_answers_alone_are_broken() -> None:
    """Fluency is pooled over users, so one user's broken adapter passes the goal's rule; the goal
    object and its words name that user."""
    from bench.forgetting import report

    finals = [
        _run(u, key, "final", 0.5, -0.02, degenerate=3 if (u, key) == ("u0", "bapo") else 0)
        for u in (f"u{i}" for i in range(10))
        for key in ("dpo", "bapo")
    ]
    goal = select.goal(finals, "dpo", "bapo")
    assert goal["fluency_ok"]  # 3 of 40 answers: within the base's share + the margin
    assert goal["unfluent_users"] == {
        "dpo": {},
        "bapo": {"u0": {"degenerate_fraction": 0.75, "base_degenerate_fraction": 0.0}},
    }
    (line,) = report.unfluent_line(goal)
    assert "the default: u0 (75% degenerate, base 0%); tuned DPO: none." in line
    goal["unfluent_users"]["bapo"] = {}
    assert report.unfluent_line(goal) == []


def test_judge_flags_repetition_and_scores_the_persona(model_path: Path) -> None:
    from foundation.model import load_model, load_tokenizer
    from worker.training.judge import persona_scores, repeated_ngram_fraction

    assert repeated_ngram_fraction([1, 2, 3, 4, 5, 6]) == 0.0
    assert repeated_ngram_fraction([7, 8, 9, 10] * 5) > 0.5
    model, tokenizer = load_model(model_path), load_tokenizer(model_path)
    prompt = [{"role": "user", "content": "Describe the sea."}]
    pirate = tokenizer("Arr matey, the sea be wild and salty, arr!")["input_ids"]
    plain = tokenizer("The sea is a large body of salt water.")["input_ids"]
    instruction = "Answer like a pirate."
    told = persona_scores(model, tokenizer, [prompt, prompt], [pirate, plain], instruction)
    assert told[0] > told[1]  # the instruction makes the pirate answer likelier, per token


def test_length_band_takes_the_bound_of_the_longest_length_reached() -> None:
    from worker.training.judge import LengthBand, bound_for, content_ids

    band = LengthBand((2, 8, 32), (4.0, 2.5, 1.5), 0.95, (40, 30, 20))
    assert [band.bound(n) for n in (1, 2, 7, 8, 31, 32, 500)] == [4.0, 4.0, 4.0, 2.5, 2.5, 1.5, 1.5]
    assert bound_for(3.0, 5) == 3.0 and bound_for(band, 9) == 2.5
    assert content_ids([5, 6, 2, 198], 2) == [5, 6] and content_ids([5, 6], 2) == [5, 6]


def test_fluency_scores_content_only_and_judges_short_answers_by_short_text(
    model_path: Path,
) -> None:
    from foundation.model import load_model, load_tokenizer
    from foundation.stats import quantile
    from worker.training.judge import fluency, length_band, token_nll

    model, tokenizer = load_model(model_path), load_tokenizer(model_path)
    eot = tokenizer.eos_token_id
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    short = tokenizer("Paris.", add_special_tokens=False)["input_ids"]
    ended = fluency(model, tokenizer, [prompt], [("Paris.", [*short, eot])])
    plain = fluency(model, tokenizer, [prompt], [("Paris.", short)])
    assert ended.nll == pytest.approx(plain.nll, abs=1e-4) and ended.tokens == [len(short)]
    # the band of long fluent texts: a per-token mean over few tokens spreads wider, so the
    # bound at 2 tokens is the 95th percentile of the texts' first 2 tokens, not of all 64
    long_texts = [
        "The capital of France is Paris, a city on the Seine known for its museums, its "
        "cafés and the Eiffel Tower, which was built for the world fair of 1889.",
        "France's capital is Paris. It is the country's largest city and its centre of "
        "government, culture and business, with about two million people.",
    ] * 12
    fluent = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in long_texts]
    prompts = [prompt] * len(fluent)
    band = length_band(model, tokenizer, prompts, fluent, 0.95)
    rows = token_nll(model, tokenizer, prompts, fluent)
    first_two = [sum(r[:2]) / 2 for r in rows]
    assert band.bounds[0] == pytest.approx(quantile(first_two, 0.95), abs=1e-5)
    assert band.lengths[0] == 2 and band.texts[0] == len(fluent)
    assert max(band.lengths) <= min(len(f) for f in fluent)


def test_a_dead_workers_claim_is_taken_over_and_a_live_ones_is_not(tmp_path: Path) -> None:
    import subprocess
    import types

    from bench.forgetting.benchmark import Benchmark
    from bench.forgetting.runner import RunSpec

    session: Any = types.SimpleNamespace(work_dir=tmp_path)
    bench = Benchmark(session, tmp_path / "out.json", {}, [])
    spec = RunSpec("dpo_tuning", "u1", Setting("dpo", 1e-3, 4), 0)
    bench.claims.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    bench.claim_path(spec).write_text(str(gone.pid))  # its worker died mid-run
    assert bench.claim(spec) and bench.claim_path(spec).read_text() == str(os.getpid())
    assert not bench.claim(spec)  # now held by a live process (this one)


def test_the_engine_default_is_the_benchmarks_chosen_setting() -> None:
    """TrainConfig's BAPO defaults are what the recorded run chose (issue: the default comes
    from the frontier), at the same number of passes over the training pairs."""
    from foundation.train_config import TrainConfig

    recorded = json.loads((REPO_ROOT / "bench/results/forgetting.json").read_text())
    chosen = recorded["selection"]["default"]["selected"]
    default = TrainConfig()
    assert default.method == chosen["method"] == "bapo"
    assert default.anchor_form == chosen["anchor_form"]
    assert default.anchor_weight == chosen["anchor_weight"]
    assert default.anchor_tolerance == chosen["anchor_tolerance"]
    assert default.learning_rate == chosen["learning_rate"]
    plan = PLANS[recorded["mode"]]()
    bench_config = plan.train_config(0, Setting("bapo", 1e-3, 1))
    passes = chosen["steps"] * bench_config.batch_size / plan.sizes.train
    assert default.epochs == passes
    assert default.base_max_new_tokens == bench_config.base_max_new_tokens


def test_compare_reports_each_measures_largest_difference_in_standard_errors() -> None:
    from bench.forgetting.compare import compare

    def run(key: str, movement: float) -> dict[str, Any]:
        return {"key": key, "train_wall_s": 1.0, "train": {"history": [{"loss": 0.5}]},
                "persona": {"movement": movement, "movement_stderr": 0.1}}  # fmt: skip

    before = {"runs": [run("a", 0.2), run("b", 0.3), run("gone", 0.0)]}
    after = {"runs": [run("a", 0.25), run("b", 0.1), run("new", 0.0)]}
    result = compare(before, after)
    assert set(result["runs"]) == {"a", "b"}
    assert result["only_before"] == ["gone"] and result["only_after"] == ["new"]
    assert result["worst"]["persona movement"]["max_abs_diff"] == pytest.approx(0.2)
    assert result["worst"]["persona movement"]["max_diff_in_stderr"] == pytest.approx(2.0)
    assert result["worst"]["final loss"] == {"max_abs_diff": 0.0, "max_diff_in_stderr": 0.0}


def test_the_goal_says_where_dpo_forgets_when_the_tuned_dpo_does_not() -> None:
    from bench.forgetting import report

    def point(lr: float, delta: float, se: float, se_questions: float, fluent: bool) -> Any:
        return {"setting": {"learning_rate": lr, "steps": 32}, "knowledge_delta": delta,
                "knowledge_delta_stderr": se, "knowledge_delta_stderr_questions": se_questions,
                "fluent": fluent}  # fmt: skip

    grid = [point(5e-4, -0.01, 0.02, 0.02, True), point(2e-3, -0.06, 0.01, 0.02, False)]
    line = report.dpo_forgetting_line({"selection": {"dpo": {"points": grid}}})
    assert "at: lr 0.002 × 32 steps, -6.0 pp (se 2.0), not fluent." in line
    assert "0.0005" not in line
    # the larger se counts: with 4 pp over questions, -6 pp is within 2 se
    grid[1] = point(2e-3, -0.06, 0.01, 0.04, False)
    line = report.dpo_forgetting_line({"selection": {"dpo": {"points": grid}}})
    assert "either; the largest loss is at lr 0.002 × 32 steps, -6.0 pp (se 4.0)" in line
