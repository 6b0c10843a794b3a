"""A real (tiny) training run on the bundled model: BAPO vs DPO, caches, saved adapter, cancel."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from foundation.model import model_identity
from foundation.pairs import Pair, prompt_hash
from foundation.train_config import TrainConfig
from tests.unit.training.helpers import make_pairs
from worker.training.anchors import compute_anchors
from worker.training.cache import MemoryCache
from worker.training.data import encode_pair
from worker.training.evaluate import MCQuestion
from worker.training.trainer import TrainingCancelled, TrainResult, train

pytestmark = pytest.mark.slow

# 6 pairs, 1 held out (same seed → same split for both methods); all 5 train pairs in one batch.
TINY = TrainConfig(
    beta=0.1,
    anchor_weight=1.0,
    learning_rate=5e-3,
    max_steps=4,
    batch_size=5,
    lora_rank=8,
    lora_alpha=16,
    lora_dropout=0.0,
    warmup_ratio=0.0,
    max_prompt_tokens=64,
    max_response_tokens=24,
    base_max_new_tokens=16,
    heldout_fraction=0.2,
    min_pairs_for_heldout=6,
    seed=7,
)
SERVED_NAME = "tiny-served-name"

MC_QUESTIONS = [
    MCQuestion("What is the capital of France?", ("Paris", "Berlin"), 0),
    MCQuestion("How many legs does a cat have?", ("Two", "Four"), 1),
]


class Runs:
    """The two trainings shared by this module's tests, with what their callbacks saw."""

    def __init__(self) -> None:
        self.base_cache, self.ref_cache = MemoryCache(), MemoryCache()
        self.phases: list[str] = []
        self.steps: list[dict[str, Any]] = []
        self.results: dict[str, TrainResult] = {}


@pytest.fixture(scope="module")
def runs(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """BAPO first (fills the caches), then DPO with the same caches, seed and pairs."""
    state = Runs()
    out = tmp_path_factory.mktemp("adapters")
    for method in ("bapo", "dpo"):
        state.results[method] = train(
            model_dir, make_pairs(), replace(TINY, method=method), out_dir=out / method,
            base_cache=state.base_cache, ref_cache=state.ref_cache,
            on_step=state.steps.append if method == "bapo" else None,
            on_phase=state.phases.append if method == "bapo" else None,
            mc_questions=MC_QUESTIONS if method == "bapo" else None,
            served_model_name=SERVED_NAME,
        )  # fmt: skip
    return state


def test_reward_margin_increases(runs: Runs) -> None:
    for result in runs.results.values():
        first = result.history[0]["reward_margin"]
        assert first == pytest.approx(0.0, abs=1e-3)  # LoRA starts as a no-op
        assert result.metrics["train_reward_margin"] > first + 0.1
        assert result.metrics["train_reward_accuracy"] == 1.0


def test_bapo_keeps_base_answers_more_likely_than_dpo(
    runs: Runs, base_model: Any, tokenizer: Any, model_dir: Path
) -> None:
    """DPO's adapter is scored on the base answers BAPO anchored (DPO jobs prepare none)."""
    from peft import PeftModel

    from worker.training.evaluate import pair_metrics
    from worker.training.trainer import split_heldout

    assert "train_anchor_logratio" not in runs.results["dpo"].metrics
    pairs = make_pairs()
    anchors = compute_anchors(
        base_model, tokenizer, pairs, TINY, model_identity(model_dir),
        base_cache=runs.base_cache, ref_cache=runs.ref_cache,
    )  # fmt: skip
    assert anchors.stats.base_computed == 0  # the ones BAPO trained with
    encoded = [
        encode_pair(tokenizer, pair, TINY.max_prompt_tokens, TINY.max_response_tokens,
                    base_ids=anchors.base_ids(i))
        for i, pair in enumerate(pairs)
    ]  # fmt: skip
    for i, item in enumerate(encoded):
        item.ref_logps = anchors.ref_logps(i)
    train_idx, _ = split_heldout(len(pairs), TINY, [prompt_hash(p.messages) for p in pairs])
    model = PeftModel.from_pretrained(base_model, str(runs.results["dpo"].adapter_dir)).eval()
    try:
        dpo = pair_metrics(model, [encoded[i] for i in train_idx], TINY, tokenizer.pad_token_id)
    finally:
        model.unload()
    bapo = runs.results["bapo"].metrics
    assert bapo["train_anchor_logratio"] > dpo["anchor_logratio"]
    assert dpo["anchor_logratio"] < 0  # DPO drifts away from the base answers here


def test_callbacks_and_counts(runs: Runs) -> None:
    assert runs.phases == [
        "loading", "base_responses", "reference_logprobs", "training", "evaluating", "saving"
    ]  # fmt: skip
    assert [s["step"] for s in runs.steps] == [1, 2, 3, 4]
    expected = {
        *("step", "epoch", "lr", "grad_norm", "tokens", "loss", "dpo_loss", "anchor_loss"),
        *("reward_accuracy", "reward_margin", "anchor_logratio", "anchor_below_frac"),
    }
    assert expected <= set(runs.steps[0])
    bapo = runs.results["bapo"]
    assert (bapo.num_pairs, bapo.num_train_pairs, bapo.num_heldout_pairs) == (6, 5, 1)
    assert 0.0 <= bapo.metrics["heldout_preference_accuracy"] <= 1.0
    assert bapo.tokens_trained == sum(s["tokens"] for s in runs.steps) and bapo.tokens_per_s > 0
    assert bapo.positions_forwarded == sum(s["positions"] for s in runs.steps)
    assert bapo.positions_forwarded >= bapo.tokens_trained  # padding, if any, on top
    assert "anchor_logratio" not in runs.results["dpo"].history[0]  # DPO skips base rows


def test_knowledge_retention_is_measured_when_asked(runs: Runs) -> None:
    bapo, dpo = runs.results["bapo"].metrics, runs.results["dpo"].metrics
    assert bapo["mc_questions"] == 2
    assert bapo["mc_retention_delta"] == bapo["mc_adapter_accuracy"] - bapo["mc_base_accuracy"]
    assert "mc_retention_delta" not in dpo


def test_second_run_reuses_every_cached_value(runs: Runs) -> None:
    first, second = runs.results["bapo"].cache_stats, runs.results["dpo"].cache_stats
    assert (first.base_computed, first.ref_computed) == (6, 18)
    assert (second.base_computed, second.ref_computed) == (0, 0)
    # DPO neither generates nor scores base answers: it reuses chosen and rejected only
    assert (second.base_reused, second.ref_reused) == (0, 12)


def test_one_more_pair_computes_only_that_pair(runs: Runs, model_dir: Path, tokenizer: Any) -> None:
    from foundation.model import load_model

    extra = make_pairs([("Name a fruit.", "Arr, a banana, matey!", "A banana.")])
    anchors = compute_anchors(
        load_model(model_dir), tokenizer, make_pairs() + extra, TINY, model_identity(model_dir),
        base_cache=runs.base_cache, ref_cache=runs.ref_cache,
    )  # fmt: skip
    assert (anchors.stats.base_computed, anchors.stats.base_reused) == (1, 6)
    assert anchors.stats.ref_computed == 3  # chosen, rejected and base answer of the new pair


def test_saved_adapter_is_vllm_compatible_and_complete(runs: Runs) -> None:
    adapter = runs.results["bapo"].adapter_dir
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == SERVED_NAME
    assert config["use_dora"] is False and not config["modules_to_save"]
    assert config["r"] == 8 and set(config["target_modules"]) == set(TINY.target_modules)
    metrics = json.loads((adapter / "metrics.json").read_text())
    assert metrics["metrics"] == runs.results["bapo"].metrics
    assert len(metrics["history"]) == 4 and metrics["config"]["method"] == "bapo"
    assert not [p for p in adapter.parent.iterdir() if ".tmp-" in p.name]


def test_saved_adapter_loads_with_peft_and_changes_logits(
    runs: Runs, base_model: Any, tokenizer: Any
) -> None:
    from peft import PeftModel

    ids = tokenizer("Hello there, how are you?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base_logits = base_model(input_ids=ids).logits
        model = PeftModel.from_pretrained(base_model, str(runs.results["bapo"].adapter_dir))
        try:
            tuned_logits = model(input_ids=ids).logits
        finally:
            model.unload()
    assert (tuned_logits - base_logits).abs().max() > 1e-2


def test_cancel_between_steps_saves_nothing(runs: Runs, model_dir: Path, tmp_path: Path) -> None:
    seen: list[int] = []
    with pytest.raises(TrainingCancelled):
        train(
            model_dir, make_pairs(), TINY, out_dir=tmp_path / "cancelled",
            base_cache=runs.base_cache, ref_cache=runs.ref_cache,
            on_step=lambda m: seen.append(m["step"]), should_cancel=lambda: len(seen) >= 1,
        )  # fmt: skip
    assert seen == [1]
    assert list(tmp_path.iterdir()) == []


def test_existing_output_folder_is_refused_before_any_work(model_dir: Path, tmp_path: Path) -> None:
    from worker.training.artifacts import AdapterExistsError

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    pairs: list[Pair] = make_pairs()
    with pytest.raises(AdapterExistsError):
        train(model_dir, pairs, TINY, out_dir=tmp_path / "taken", on_phase=pytest.fail)


def test_capped_base_answers_get_no_invented_end_of_turn(model_dir: Path, tokenizer: Any) -> None:
    """A base answer cut at base_max_new_tokens is anchored on exactly the tokens the model
    wrote (no end-of-turn); a finished one keeps the end-of-turn the model produced."""
    from foundation.model import load_model
    from worker.training.data import encode_pair, encode_response

    model = load_model(model_dir)
    pairs = make_pairs([("Write a long essay about the history of Rome.", "Rome.", "No.")])
    pairs += make_pairs([("Say only the word: yes", "yes", "no")])
    config = replace(TINY, base_max_new_tokens=6)
    anchors = compute_anchors(model, tokenizer, pairs, config, model_identity(model_dir))
    capped = anchors.base_responses[0]
    assert not capped.finished and len(capped.token_ids) == 6
    assert tokenizer.eos_token_id not in capped.token_ids
    item = encode_pair(tokenizer, pairs[0], 64, 24, base_ids=capped.token_ids)
    assert item.base == capped.token_ids  # scored as generated, nothing appended
    # the old way (decode, re-encode as a whole assistant turn) appends an end-of-turn
    invented = encode_response(tokenizer, pairs[0].messages, capped.text, 24)
    assert tokenizer.eos_token_id in invented
    finished = compute_anchors(
        model, tokenizer, pairs[1:], replace(TINY, base_max_new_tokens=24),
        model_identity(model_dir),
    ).base_responses[0]  # fmt: skip
    assert finished.finished and finished.token_ids[-1] == tokenizer.eos_token_id


def test_a_poisoned_reference_cache_fails_the_job_at_step_one(
    model_dir: Path, tmp_path: Path
) -> None:
    """At step 1 LoRA is zero, so every h must be ≈ 0; a cache from another model is refused."""
    from worker.training.anchors import reference_key
    from worker.training.trainer import StaleReferenceError

    pairs = make_pairs()
    identity = model_identity(model_dir)
    ref_cache = MemoryCache()
    ref_cache.put_many(
        {reference_key(identity, p.messages, p.chosen, TINY): -1.0 for p in pairs}
    )  # log-probs "of another model"
    with pytest.raises(StaleReferenceError, match="do not match the base model"):
        train(model_dir, pairs, TINY, out_dir=tmp_path / "adapter", ref_cache=ref_cache)
    assert not (tmp_path / "adapter").exists()
