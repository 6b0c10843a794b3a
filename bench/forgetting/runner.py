"""Orchestration: measure the base model once, then train and measure one adapter per run.

A run is one (user, method, λ) training through the engine's `train()`; every run of a user sees
the same pairs, seed, steps and LoRA settings. Base responses and reference log-probs go through
the engine's caches, so they are computed once per prompt/response and reused by every run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.forgetting import datasets, measures
from bench.forgetting.datasets import ScoredPair
from bench.forgetting.plan import Plan
from bench.forgetting.users import DIMENSIONS, User, dimension_users, dsp_users, pole_responses
from worker.training.anchors import compute_anchors
from worker.training.cache import JsonFileCache, KeyValueCache, MemoryCache
from worker.training.config import TrainConfig
from worker.training.data import EncodedPair, Messages, Pair, encode_pair
from worker.training.evaluate import MCQuestion
from worker.training.model import CausalLM, load_model, load_tokenizer, model_identity
from worker.training.trainer import TrainResult, train

if TYPE_CHECKING:
    pass

Log = Callable[[str], None]
EVAL_SLICES = ("validation", "test")
HISTORY_KEYS = ("step", "loss", "dpo_loss", "anchor_loss", "reward_accuracy", "anchor_logratio")


@dataclass(frozen=True)
class Method:
    """A training method: DPO, or BAPO with anchor weight λ."""

    name: str  # "dpo" | "bapo"
    anchor_weight: float = 0.0

    @property
    def key(self) -> str:
        """Stable id, e.g. 'dpo' or 'bapo@0.3'."""
        return "dpo" if self.name == "dpo" else f"bapo@{self.anchor_weight:g}"

    @property
    def label(self) -> str:
        """Human label, e.g. 'DPO' or 'BAPO λ=0.3'."""
        return "DPO" if self.name == "dpo" else f"BAPO λ={self.anchor_weight:g}"


@dataclass
class Session:
    """Everything shared by the runs: plan, model, tokenizer, caches, base measurements."""

    plan: Plan
    seed: int
    data_dir: Path
    model_path: Path
    work_dir: Path
    log: Log
    identity: str = ""
    tokenizer: Any = None
    base_model: Any = None
    base_cache: KeyValueCache = field(default_factory=MemoryCache)
    ref_cache: KeyValueCache = field(default_factory=MemoryCache)
    knowledge: dict[str, list[MCQuestion]] = field(default_factory=dict)  # kept sets only
    screening: dict[str, dict[str, Any]] = field(default_factory=dict)
    base_knowledge: dict[str, measures.MCOutcomes] = field(default_factory=dict)
    alignment: dict[str, list[ScoredPair]] = field(default_factory=dict)
    base_alignment: dict[str, list[float]] = field(default_factory=dict)
    users: list[User] = field(default_factory=list)
    encoded: dict[str, dict[str, list[EncodedPair]]] = field(default_factory=dict)
    base_preference: dict[str, dict[str, Any]] = field(default_factory=dict)
    base_generations: dict[str, list[str]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    cache_at_start: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> TrainConfig:
        """The shared training config (DPO flavour; runs change only method and λ)."""
        return self.plan.train_config(self.seed, "dpo", 0.0)


def open_session(
    plan: Plan,
    seed: int,
    *,
    data_dir: Path,
    model_path: Path,
    work_dir: Path,
    cache_dir: Path,
    log: Log,
) -> Session:
    """Load the model and tokenizer; open the engine's JSON caches in cache_dir (kept across
    benchmark runs: base responses and reference log-probs depend only on model and prompt)."""
    session = Session(plan, seed, data_dir, model_path, work_dir, log)
    session.identity = model_identity(model_path)
    session.tokenizer = load_tokenizer(model_path)
    session.base_model = load_model(model_path)
    base_cache = JsonFileCache(cache_dir / "base_responses.json")
    ref_cache = JsonFileCache(cache_dir / "reference_logprobs.json")
    session.base_cache, session.ref_cache = base_cache, ref_cache
    session.cache_at_start = {
        "dir": str(cache_dir),
        "base_responses": len(base_cache.data),
        "reference_logprobs": len(ref_cache.data),
    }
    return session


def _timed(session: Session, name: str, action: Callable[[], None]) -> None:
    """Run an action, log it and keep its duration in session.timings."""
    session.log(f"{name} ...")
    started = time.perf_counter()
    action()
    session.timings[name] = time.perf_counter() - started
    session.log(f"{name} done in {session.timings[name]:.0f}s")


# --- base measurements ------------------------------------------------------------------------


def measure_base(session: Session) -> None:
    """Screen the MC sets, score HH-RLHF, build the users and score their held-out pairs."""
    _timed(session, "screen_knowledge_sets", lambda: screen_knowledge(session))
    _timed(session, "base_alignment", lambda: base_alignment(session))
    _timed(session, "build_users", lambda: build_users(session))
    _timed(session, "base_user_measures", lambda: base_user_measures(session))


def screen_knowledge(session: Session) -> None:
    """Base accuracy on each candidate set's fixed subset; keep sets clearly above chance."""
    for name, n in session.plan.mc_sets:
        questions = datasets.seeded_sample(
            datasets.mc_set(name).read(session.data_dir), n, session.seed, name
        )
        outcomes = measures.mc_outcomes(session.base_model, session.tokenizer, questions)
        result = outcomes.result()
        chance = datasets.chance_accuracy(questions)
        z = (result.accuracy - chance) / result.stderr if result.stderr > 0 else 0.0
        kept = z >= session.plan.min_z_above_chance
        session.screening[name] = {
            "source": datasets.mc_set(name).source,
            **result.to_dict(),
            "chance": chance,
            "z_above_chance": z,
            "kept": kept,
        }
        session.log(
            f"  {name}: base {result.accuracy:.3f} ± {result.stderr:.3f} "
            f"(chance {chance:.2f}, z {z:.1f}) {'kept' if kept else 'dropped'}"
        )
        if kept:
            session.knowledge[name] = questions
            session.base_knowledge[name] = outcomes


def short_hh_pairs(session: Session, split: str) -> list[ScoredPair]:
    """A seeded sample of HH-RLHF pairs short enough to score untruncated."""
    config, tokenizer = session.config, session.tokenizer
    pairs = datasets.read_hh_pairs(session.data_dir, split)
    shuffled = datasets.seeded_sample(pairs, len(pairs), session.seed, f"hh:{split}")
    chosen: list[ScoredPair] = []
    for pair in shuffled:
        if len(chosen) == session.plan.hh_pairs_per_split:
            break
        prompt = tokenizer.apply_chat_template(pair.messages, tokenize=False)
        responses = (pair.chosen, pair.rejected)
        if len(tokenizer(str(prompt))["input_ids"]) <= config.max_prompt_tokens - 8 and all(
            len(tokenizer(text)["input_ids"]) <= config.max_response_tokens - 2
            for text in responses
        ):
            chosen.append(pair)
    return chosen


def base_alignment(session: Session) -> None:
    """Base model's HH-RLHF outcomes per split."""
    for split in ("helpful-base", "harmless-base"):
        pairs = short_hh_pairs(session, split)
        session.alignment[split] = pairs
        session.base_alignment[split] = measures.alignment_outcomes(
            session.base_model, session.tokenizer, pairs, session.config
        )


def build_users(session: Session) -> None:
    """DSP users, then dimension users whose pairs the base model generates (cached)."""
    plan, data_dir = session.plan, session.data_dir
    if plan.dsp_domains:
        records = datasets.read_dsp(data_dir)
        session.users += dsp_users(records, plan.dsp_domains, plan.sizes, session.seed)
    if plan.dimensions:
        prompts = dimension_prompts(session)
        for dimension, poles in plan.dimensions:
            answers = {
                pole: pole_responses(
                    session.base_model,
                    session.tokenizer,
                    prompts,
                    instruction,
                    identity=session.identity,
                    cache=session.base_cache,
                    config=session.config,
                )
                for pole, instruction in DIMENSIONS[dimension].items()
            }
            session.users += dimension_users(dimension, poles, prompts, answers, plan.sizes)
    session.log(f"  users: {', '.join(u.name for u in session.users)}")


def dimension_prompts(session: Session) -> list[str]:
    """Koala (P-SOUPS eval) prompts, topped up with DSP queries; seeded order; a few spare."""
    sizes = session.plan.sizes
    need = sizes.total + max(2, sizes.total // 10)  # spare: some poles answer identically
    koala = datasets.read_koala_prompts(session.data_dir)
    koala = datasets.seeded_sample(koala, len(koala), session.seed, "koala")
    if len(koala) < need:
        dsp = [r.query for r in datasets.read_dsp(session.data_dir)]
        dsp = datasets.seeded_sample(dsp, len(dsp), session.seed, "dimension-dsp-queries")
        koala += [q for q in dsp if q not in koala][: need - len(koala)]
    # shuffled together, so Koala prompts and DSP queries are spread over the three slices
    return datasets.seeded_sample(koala, need, session.seed, "dimension-prompts")


def encode_slice(session: Session, pairs: list[Pair]) -> list[EncodedPair]:
    """Encode pairs with base responses and reference log-probs from the engine (cached)."""
    config, tokenizer = session.config, session.tokenizer
    anchors = compute_anchors(
        session.base_model,
        tokenizer,
        pairs,
        config,
        session.identity,
        base_cache=session.base_cache,
        ref_cache=session.ref_cache,
    )
    encoded = []
    for i, pair in enumerate(pairs):
        item = encode_pair(
            tokenizer,
            pair,
            config.max_prompt_tokens,
            config.max_response_tokens,
            base_ids=anchors.base_responses[i].token_ids,
        )
        item.ref_logps = (anchors.ref_chosen[i], anchors.ref_rejected[i], anchors.ref_base[i])
        encoded.append(item)
    return encoded


def base_user_measures(session: Session) -> None:
    """Held-out pairs encoded once per user; base generations for the rule users."""
    for user in session.users:
        session.encoded[user.name] = {s: encode_slice(session, user.slices[s]) for s in EVAL_SLICES}
        session.base_preference[user.name] = {
            s: _base_pair_summary(session.encoded[user.name][s]) for s in EVAL_SLICES
        }
        if user.rule:
            prompts = user.prompts("test")
            key = json.dumps(prompts)
            if key not in session.base_generations:
                session.base_generations[key] = _generate(session, session.base_model, prompts)


def _base_pair_summary(pairs: list[EncodedPair]) -> dict[str, Any]:
    """The base model's pair measures: every log-ratio is 0 by definition."""
    zeros = [0.0] * len(pairs)
    refs = [p.ref_logps or (0.0, 0.0, 0.0) for p in pairs]
    scores = measures.PairScores(zeros, zeros, zeros, [r[0] for r in refs], [r[1] for r in refs])
    summary = scores.summary()
    summary["preference_accuracy"] = 0.5  # h_w = h_l = 0: a tie, i.e. chance
    return summary


def _generate(session: Session, model: CausalLM, prompts: list[Messages]) -> list[str]:
    """Greedy generations for the text rules."""
    config = session.config
    return measures.generate(
        model,
        session.tokenizer,
        prompts,
        session.plan.gen_max_new_tokens,
        config.base_batch_size,
        config.max_prompt_tokens,
    )


# --- one run ----------------------------------------------------------------------------------


def run_one(session: Session, user: User, method: Method) -> dict[str, Any]:
    """Train one adapter through the engine and measure it against the base."""
    config = session.plan.train_config(session.seed, method.name, method.anchor_weight)
    out_dir = session.work_dir / "adapters" / f"{user.name.replace(':', '-')}--{method.key}"
    started = time.perf_counter()
    result = train(
        session.model_path,
        user.slices["train"],
        config,
        out_dir=out_dir,
        base_cache=session.base_cache,
        ref_cache=session.ref_cache,
        on_step=lambda record: _log_step(session, record),
        on_phase=lambda phase: session.log(f"  phase {phase}"),
    )
    trained = time.perf_counter()
    record = evaluate_adapter(session, user, out_dir)
    record.update(
        user=user.name,
        method=method.name,
        method_key=method.key,
        label=method.label,
        anchor_weight=config.effective_anchor_weight,
        train=_train_record(result),
        train_wall_s=trained - started,
        eval_wall_s=time.perf_counter() - trained,
    )
    return record


def _log_step(session: Session, record: dict[str, Any]) -> None:
    """Progress every 8 steps (and the last): losses, reward accuracy, anchor drift."""
    if record["step"] % 8 and record["step"] != session.plan.steps:
        return
    anchor = record.get("anchor_logratio")
    session.log(
        f"  step {record['step']}: loss {record['loss']:.3f} (dpo {record['dpo_loss']:.3f}), "
        f"reward acc {record['reward_accuracy']:.2f}"
        + ("" if anchor is None else f", anchor log-ratio {anchor:+.1f}")
    )


def _train_record(result: TrainResult) -> dict[str, Any]:
    """What the benchmark keeps of the engine's TrainResult."""
    return {
        "config": result.config,
        "metrics": result.metrics,
        "steps": result.steps,
        "num_train_pairs": result.num_train_pairs,
        "tokens_trained": result.tokens_trained,
        "train_time_s": result.train_time_s,
        "wall_time_s": result.wall_time_s,
        "tokens_per_s": result.tokens_per_s,
        "cache_stats": vars(result.cache_stats),
        "history": [{k: r[k] for k in HISTORY_KEYS if k in r} for r in result.history],
    }


def load_adapter(session: Session, adapter_dir: Path) -> CausalLM:
    """A fresh base model with the trained adapter merged into its weights, in eval mode.

    Merging gives the same function as the unmerged PEFT model (up to float rounding) and scores
    ≈ 1.5× faster on the CPU, where evaluation is most of a run's time.
    """
    from peft import PeftModel

    base = load_model(session.model_path)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()


def evaluate_adapter(session: Session, user: User, adapter_dir: Path) -> dict[str, Any]:
    """Knowledge, general alignment, the user's held-out pairs and (rule users) generations."""
    model = load_adapter(session, adapter_dir)
    tokenizer, config = session.tokenizer, session.config
    knowledge = {
        name: measures.mc_outcomes(model, tokenizer, questions)
        for name, questions in session.knowledge.items()
    }
    alignment = {
        split: measures.alignment_outcomes(model, tokenizer, pairs, config)
        for split, pairs in session.alignment.items()
    }
    preference = {
        s: measures.pair_scores(
            model, session.encoded[user.name][s], tokenizer.pad_token_id, config.score_batch_size
        ).summary()
        for s in EVAL_SLICES
    }
    record: dict[str, Any] = {
        "knowledge": knowledge_record(session, knowledge),
        "alignment": alignment_record(session, alignment),
        "preference": preference,
    }
    if user.rule:
        record["rule"] = rule_record(session, user, _generate(session, model, user.prompts("test")))
    return record


def knowledge_record(session: Session, outcomes: dict[str, measures.MCOutcomes]) -> dict[str, Any]:
    """Per kept set and pooled: accuracy, change vs base with its paired stderr, the hits."""
    record: dict[str, Any] = {}
    pooled_base: list[float] = []
    pooled: list[float] = []
    for name, result in outcomes.items():
        base = session.base_knowledge[name].hits
        record[name] = {
            **result.result().to_dict(),
            **_change(measures.paired_change(base, result.hits)),
            "hits": "".join(str(int(h)) for h in result.hits),
        }
        pooled_base += base
        pooled += result.hits
    record["pooled"] = {
        "accuracy": measures.mean(pooled),
        "n": len(pooled),
        **_change(measures.paired_change(pooled_base, pooled)),
    }
    return record


def _change(change: dict[str, float]) -> dict[str, float]:
    """Rename a paired change's fields for the JSON record."""
    return {"delta": change["delta"], "delta_stderr": change["stderr"]}


def alignment_record(session: Session, outcomes: dict[str, list[float]]) -> dict[str, Any]:
    """HH-RLHF: fraction preferring the human-preferred answer, and its change vs base."""
    record: dict[str, Any] = {}
    pooled_base: list[float] = []
    pooled: list[float] = []
    for split, hits in outcomes.items():
        base = session.base_alignment[split]
        record[split] = {
            "accuracy": measures.mean(hits),
            "n": len(hits),
            **_change(measures.paired_change(base, hits)),
        }
        pooled_base += base
        pooled += hits
    record["pooled"] = {
        "accuracy": measures.mean(pooled),
        "n": len(pooled),
        **_change(measures.paired_change(pooled_base, pooled)),
    }
    return record


def rule_record(session: Session, user: User, texts: list[str]) -> dict[str, Any]:
    """The user's text rule on held-out generations vs the base model's on the same prompts."""
    assert user.rule is not None
    rule = measures.RULES[user.rule]
    base_texts = session.base_generations[json.dumps(user.prompts("test"))]
    base_values = [rule(t) for t in base_texts]
    values = [rule(t) for t in texts]
    moves = [user.rule_sign * (v - b) for v, b in zip(values, base_values, strict=True)]
    wins = [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in moves]
    return {
        "rule": user.rule,
        "base_mean": measures.mean(base_values),
        "mean": measures.mean(values),
        "toward_user": measures.mean(moves),
        "toward_user_stderr": measures.stderr(moves),
        "win_rate": measures.mean(wins),
        "win_rate_stderr": measures.stderr(wins),
        "examples": [
            {"base": b[:300], "adapter": t[:300]}
            for b, t in zip(base_texts[:2], texts[:2], strict=True)
        ],
    }
