"""Orchestration pieces: measure the base model once, then train and judge one adapter per run.

A run is one (phase, user, setting, seed) training through the engine's `train()`; every run of a
user sees the same pairs. Base answers and reference log-probs go through the engine's caches, so
they are computed once per prompt/response and reused by every run. Selection runs are judged on
validation prompts with the selection MC subset; final runs on test prompts with the full set.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from bench.forgetting import datasets, measures
from bench.forgetting.datasets import ScoredPair
from bench.forgetting.plan import Plan, Setting
from bench.forgetting.users import DIMENSIONS, User, dimension_users, dsp_users, pole_responses
from foundation.model import CausalLM, load_model, load_tokenizer, model_identity
from foundation.pairs import Messages, Pair
from foundation.train_config import TrainConfig
from worker.training.anchors import Generation, cached_generations, compute_anchors
from worker.training.cache import JsonFileCache, KeyValueCache, MemoryCache
from worker.training.data import EncodedPair, encode_pair, encode_response
from worker.training.evaluate import MCQuestion
from worker.training.judge import (
    FLUENCY_RULE,
    Fluency,
    LengthBand,
    content_ids,
    fluency,
    is_degenerate,
    length_band,
    persona_scores,
)
from worker.training.trainer import TrainResult, train

Log = Callable[[str], None]
Record = dict[str, Any]
T = TypeVar("T")
SLICE_OF_PHASE = {"dpo_tuning": "validation", "bapo_variants": "validation", "final": "test"}
SCOPE_OF_PHASE = {"dpo_tuning": "selection", "bapo_variants": "selection", "final": "final"}
HISTORY_KEYS = ("step", "loss", "dpo_loss", "anchor_loss", "reward_accuracy", "anchor_logratio")
NLL_BAND_QUANTILE = 0.95  # an answer less likely than 95% of known-fluent text is broken
FLUENCY_MARGIN = 0.10  # an adapter may have at most 10 points more degenerate answers than base
TEXT_KEPT = 400  # characters of each judged answer kept in the record


@dataclass(frozen=True)
class RunSpec:
    """One training run: which phase, user, setting and training seed."""

    phase: str
    user: str
    setting: Setting
    seed: int

    @property
    def key(self) -> str:
        """Stable id used to skip recorded runs on a restart."""
        return f"{self.phase}|{self.user}|{self.setting.key}|seed={self.seed}"


@dataclass
class BaseSlice:
    """The base model on one user's slice: its greedy answers and how the judge scores them."""

    prompts: list[Messages]
    answers: list[Generation]
    persona: list[float]
    nll: list[float]
    degenerate: list[bool] = field(default_factory=list)


@dataclass
class Session:
    """Everything shared by the runs: plan, model, tokenizer, caches, base measurements."""

    plan: Plan
    data_seed: int  # fixes users' slices and MC subsets; training seeds are per run
    data_dir: Path
    model_path: Path
    work_dir: Path
    log: Log
    identity: str = ""
    tokenizer: Any = None
    base_model: Any = None
    base_cache: KeyValueCache = field(default_factory=MemoryCache)
    ref_cache: KeyValueCache = field(default_factory=MemoryCache)
    measure_cache: KeyValueCache = field(default_factory=MemoryCache)  # base measures (_memo)
    # scope ("selection" | "final") → kept set → questions / base outcomes
    knowledge: dict[str, dict[str, list[MCQuestion]]] = field(default_factory=dict)
    base_knowledge: dict[str, dict[str, measures.MCOutcomes]] = field(default_factory=dict)
    screening: dict[str, dict[str, Any]] = field(default_factory=dict)
    alignment: dict[str, list[ScoredPair]] = field(default_factory=dict)
    base_alignment: dict[str, list[float]] = field(default_factory=dict)
    users: list[User] = field(default_factory=list)
    encoded: dict[str, dict[str, list[EncodedPair]]] = field(default_factory=dict)
    base_preference: dict[str, dict[str, Any]] = field(default_factory=dict)
    base_slices: dict[str, dict[str, BaseSlice]] = field(default_factory=dict)
    nll_bound: dict[str, LengthBand] = field(default_factory=dict)  # slice → NLL band (fluent text)
    timings: dict[str, float] = field(default_factory=dict)
    cache_at_start: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> TrainConfig:
        """The shared encoding/decoding settings (runs differ only in their Setting)."""
        return self.plan.train_config(0, Setting("dpo", 1e-3, 1))

    def user(self, name: str) -> User:
        """The named user."""
        return next(u for u in self.users if u.name == name)


def open_session(
    plan: Plan,
    data_seed: int,
    *,
    data_dir: Path,
    model_path: Path,
    work_dir: Path,
    cache_dir: Path,
    log: Log,
) -> Session:
    """Load the model and tokenizer; open the engine's JSON caches in cache_dir (kept across
    benchmark runs: base answers and reference log-probs depend only on model and prompt)."""
    session = Session(plan, data_seed, data_dir, model_path, work_dir, log)
    session.identity = model_identity(model_path)
    session.tokenizer = load_tokenizer(model_path)
    session.base_model = load_model(model_path)
    base_cache = JsonFileCache(cache_dir / "base_responses.json")
    ref_cache = JsonFileCache(cache_dir / "reference_logprobs.json")
    measure_cache = JsonFileCache(cache_dir / "base_measures.json")
    session.base_cache, session.ref_cache = base_cache, ref_cache
    session.measure_cache = measure_cache
    session.cache_at_start = {
        "dir": str(cache_dir),
        "base_responses": len(base_cache.data),
        "reference_logprobs": len(ref_cache.data),
        "base_measures": len(measure_cache.data),
    }
    return session


def _memo(
    session: Session,
    name: str,
    inputs: Any,
    compute: Callable[[], T],
    dump: Callable[[T], Any] = lambda value: value,
    load: Callable[[Any], T] = lambda stored: stored,
) -> T:
    """A base-model measure, computed once per (model, measure, inputs) and kept in the session's
    measure cache: resuming the benchmark in a new session skips the base model's ~25 minutes of
    scoring. The key hashes everything the value depends on (the model's identity, the measure
    with its batch size, and its whole inputs), so a changed plan or dataset recomputes."""
    blob = json.dumps([session.identity, name, inputs], sort_keys=True, default=str)
    key = hashlib.sha256(blob.encode()).hexdigest()
    found = session.measure_cache.get_many([key])
    if key in found:
        return load(found[key])
    value = compute()
    session.measure_cache.put_many({key: dump(value)})
    return value


def _mc_outcomes(session: Session, questions: list[MCQuestion]) -> measures.MCOutcomes:
    """The base model's per-question outcomes on an MC set (cached, _memo)."""
    return _memo(
        session,
        "mc_outcomes/batch=16",
        [asdict(q) for q in questions],
        lambda: measures.mc_outcomes(session.base_model, session.tokenizer, questions),
        dump=asdict,
        load=lambda stored: measures.MCOutcomes(**stored),
    )


def _timed(session: Session, name: str, action: Callable[[], None]) -> None:
    """Run an action, log it and keep its duration in session.timings."""
    session.log(f"{name} ...")
    started = time.perf_counter()
    action()
    session.timings[name] = time.perf_counter() - started
    session.log(f"{name} done in {session.timings[name]:.0f}s")


# --- base measurements ------------------------------------------------------------------------


def measure_base(session: Session) -> None:
    """Screen the MC sets, score HH-RLHF, build the users and judge the base model's answers."""
    _timed(session, "screen_knowledge_sets", lambda: screen_knowledge(session))
    _timed(session, "base_alignment", lambda: base_alignment(session))
    _timed(session, "build_users", lambda: build_users(session))
    _timed(session, "base_user_measures", lambda: base_user_measures(session))


def screen_knowledge(session: Session) -> None:
    """Base accuracy on each set's final subset; keep sets clearly above chance, and a disjoint
    selection subset (selection_mc_fraction of the final size) of the kept ones."""
    plan = session.plan
    session.knowledge = {"selection": {}, "final": {}}
    session.base_knowledge = {"selection": {}, "final": {}}
    for name, n in plan.mc_sets:
        pool = datasets.mc_set(name).read(session.data_dir)
        final = datasets.seeded_sample(pool, n, session.data_seed, name)
        n_selection = round(n * plan.selection_mc_fraction)
        selection = datasets.seeded_sample(pool, n_selection, session.data_seed, name, skip=n)
        outcomes = _mc_outcomes(session, final)
        result = outcomes.result()
        chance = datasets.chance_accuracy(final)
        z = (result.accuracy - chance) / result.stderr if result.stderr > 0 else 0.0
        kept = z >= plan.min_z_above_chance
        session.screening[name] = {
            "source": datasets.mc_set(name).source,
            **result.to_dict(),
            "chance": chance,
            "z_above_chance": z,
            "kept": kept,
            "selection_questions": len(selection) if kept else 0,
        }
        session.log(
            f"  {name}: base {result.accuracy:.3f} ± {result.stderr:.3f} "
            f"(chance {chance:.2f}, z {z:.1f}) {'kept' if kept else 'dropped'}"
        )
        if kept:
            session.knowledge["final"][name] = final
            session.base_knowledge["final"][name] = outcomes
            if selection:
                session.knowledge["selection"][name] = selection
                session.base_knowledge["selection"][name] = _mc_outcomes(session, selection)


def short_hh_pairs(session: Session, split: str) -> list[ScoredPair]:
    """A seeded sample of HH-RLHF pairs short enough to score untruncated."""
    config, tokenizer = session.config, session.tokenizer
    pairs = datasets.read_hh_pairs(session.data_dir, split)
    shuffled = datasets.seeded_sample(pairs, len(pairs), session.data_seed, f"hh:{split}")
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
        session.base_alignment[split] = _memo(
            session,
            "alignment_outcomes",
            [[asdict(p) for p in pairs], session.config.to_dict()],
            partial(
                measures.alignment_outcomes,
                session.base_model,
                session.tokenizer,
                pairs,
                session.config,
            ),
        )


def build_users(session: Session) -> None:
    """DSP users, then dimension users whose pairs the base model generates (cached)."""
    plan, data_dir = session.plan, session.data_dir
    if plan.dsp_domains:
        records = datasets.read_dsp(data_dir)
        session.users += dsp_users(records, plan.dsp_domains, plan.sizes, session.data_seed)
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
    sizes, seed = session.plan.sizes, session.data_seed
    need = sizes.total + max(2, sizes.total // 10)  # spare: some poles answer identically
    koala = datasets.read_koala_prompts(session.data_dir)
    koala = datasets.seeded_sample(koala, len(koala), seed, "koala")
    if len(koala) < need:
        dsp = [r.query for r in datasets.read_dsp(session.data_dir)]
        dsp = datasets.seeded_sample(dsp, len(dsp), seed, "dimension-dsp-queries")
        koala += [q for q in dsp if q not in koala][: need - len(koala)]
    # shuffled together, so Koala prompts and DSP queries are spread over the three slices
    return datasets.seeded_sample(koala, need, seed, "dimension-prompts")


def encode_slice(session: Session, pairs: list[Pair]) -> list[EncodedPair]:
    """Encode pairs with base answers and reference log-probs from the engine (cached)."""
    config, tokenizer = session.config, session.tokenizer
    anchors = compute_anchors(
        session.base_model,
        tokenizer,
        pairs,
        config,
        session.identity,
        base_cache=session.base_cache,
        ref_cache=session.ref_cache,
        with_base=True,  # every method's drift is measured on the base answers
    )
    encoded = []
    for i, pair in enumerate(pairs):
        item = encode_pair(
            tokenizer,
            pair,
            config.max_prompt_tokens,
            config.max_response_tokens,
            base_ids=anchors.base_ids(i),
        )
        item.ref_logps = anchors.ref_logps(i)
        encoded.append(item)
    return encoded


def base_user_measures(session: Session) -> None:
    """Per user and judged slice: encoded pairs, the base's answers, their persona scores and
    NLL; then each slice's NLL band (by length, of known-fluent text, `fluent_band`)."""
    slices = sorted(set(SLICE_OF_PHASE.values()))
    for user in session.users:
        session.encoded[user.name] = {s: encode_slice(session, user.slices[s]) for s in slices}
        session.base_preference[user.name] = {
            s: _base_pair_summary(session.encoded[user.name][s]) for s in slices
        }
        session.base_slices[user.name] = {
            s: _judge_base(session, user, user.prompts(s)) for s in slices
        }
    eot = session.tokenizer.eos_token_id
    for s in slices:
        band = session.nll_bound[s] = fluent_band(session, s)
        for user in session.users:  # fluency()'s rule on the NLL the base slice already has
            base = session.base_slices[user.name][s]
            lengths = [len(content_ids(a.token_ids, eot)) for a in base.answers]
            base.degenerate = [
                is_degenerate(a.text, a.token_ids, nll, band.bound(n))
                for a, nll, n in zip(base.answers, base.nll, lengths, strict=True)
            ]


def fluent_band(session: Session, slice_name: str) -> LengthBand:
    """The NLL band of a slice from known-fluent text under the base model: the base's own
    answers and every user's chosen and rejected responses (written by people or by the model),
    by length (judge.length_band: the first n tokens of each text for an n-token answer).

    The band must hold fluent text in *any* user's style: the base's answers alone are its most
    likely text, so a fluent answer in a human-written style (DSP literature, NLL 1.2 vs the
    base answers' 95th percentile 1.04 in a quick run) would count as broken; and a band of
    64-token texts alone calls a concise user's fluent six-word answers broken (per-token NLL
    2.5–4.5 on 4–10 tokens, against 2.41, in the full run's first DPO runs).
    """
    prompts: list[Messages] = []
    texts: list[list[int]] = []
    for user in session.users:
        user_prompts = user.prompts(slice_name)
        prompts += user_prompts
        texts += [a.token_ids for a in session.base_slices[user.name][slice_name].answers]
        pairs = session.encoded[user.name][slice_name]
        for kind in ("chosen", "rejected"):
            prompts += user_prompts
            texts += [getattr(p, kind) for p in pairs]
    return _memo(
        session,
        "length_band/batch=16",
        [prompts, texts, NLL_BAND_QUANTILE],
        lambda: length_band(
            session.base_model, session.tokenizer, prompts, texts, NLL_BAND_QUANTILE
        ),
        dump=asdict,
        load=_length_band,
    )


def _length_band(stored: dict[str, Any]) -> LengthBand:
    """A LengthBand from its asdict() form (JSON keeps its tuples as lists)."""
    lengths, bounds, texts = (tuple(stored[k]) for k in ("lengths", "bounds", "texts"))
    return LengthBand(lengths, bounds, stored["quantile"], texts)


def _judge_base(session: Session, user: User, prompts: list[Messages]) -> BaseSlice:
    """The base model's greedy answers on prompts (cached) with their persona scores and NLL."""
    answers = judged_answers(session, session.base_model, prompts, cached=True)
    ids = [a.token_ids for a in answers]
    model, tokenizer = session.base_model, session.tokenizer
    persona = _memo(
        session,
        "persona_scores/batch=16",
        [prompts, ids, user.instruction],
        lambda: persona_scores(model, tokenizer, prompts, ids, user.instruction),
    )
    texts = [(a.text, a.token_ids) for a in answers]
    nll = _memo(
        session,
        "fluency_nll/batch=16",
        [prompts, texts],
        lambda: fluency(model, tokenizer, prompts, texts).nll,
    )
    return BaseSlice(prompts, answers, persona, nll)


def _base_pair_summary(pairs: list[EncodedPair]) -> dict[str, Any]:
    """The base model's pair measures: every log-ratio is 0 by definition."""
    zeros = [0.0] * len(pairs)
    refs = [p.ref_logps or (0.0, 0.0, 0.0) for p in pairs]
    scores = measures.PairScores(zeros, zeros, zeros, [r[0] for r in refs], [r[1] for r in refs])
    summary = scores.summary()
    summary["preference_accuracy"] = 0.5  # h_w = h_l = 0: a tie, i.e. chance
    return summary


def judged_answers(
    session: Session, model: CausalLM, prompts: list[Messages], cached: bool = False
) -> list[Generation]:
    """Greedy answers with the judged decoding settings (the base model's through the cache)."""
    config = session.plan.generation_config()
    if cached:
        cache = session.base_cache
        return cached_generations(
            model, session.tokenizer, prompts, config, session.identity, cache
        )[0]
    scratch = MemoryCache()  # an adapter's answers are never cached under the base's identity
    return cached_generations(model, session.tokenizer, prompts, config, "adapter", scratch)[0]


def _fluency(
    session: Session, prompts: list[Messages], answers: list[Generation], slice_name: str
) -> Any:
    """Fluency of answers judged by the base model against the slice's NLL band."""
    return fluency(
        session.base_model,
        session.tokenizer,
        prompts,
        [(a.text, a.token_ids) for a in answers],
        session.nll_bound[slice_name],
    )


# --- one run ----------------------------------------------------------------------------------


def run_one(session: Session, spec: RunSpec) -> Record:
    """Train one adapter through the engine and judge it against the base."""
    user = session.user(spec.user)
    config = session.plan.train_config(spec.seed, spec.setting)
    safe = spec.key.replace("|", "--").replace(" ", "_").replace(":", "-").replace("=", "")
    out_dir = session.work_dir / "adapters" / safe
    started = time.perf_counter()
    result = train(
        session.model_path,
        user.slices["train"],
        config,
        out_dir=out_dir,
        base_cache=session.base_cache,
        ref_cache=session.ref_cache,
        on_step=lambda record: _log_step(session, record, spec.setting.steps),
        on_phase=lambda phase: session.log(f"  phase {phase}"),
    )
    trained = time.perf_counter()
    record = evaluate_adapter(session, user, out_dir, spec.phase)
    record.update(
        key=spec.key,
        phase=spec.phase,
        user=user.name,
        seed=spec.seed,
        setting=spec.setting.to_dict(),
        setting_key=spec.setting.key,
        label=spec.setting.label,
        train=_train_record(result),
        train_wall_s=trained - started,
        eval_wall_s=time.perf_counter() - trained,
    )
    return record


def _log_step(session: Session, record: dict[str, Any], steps: int) -> None:
    """Progress every 8 steps (and the last): losses, reward accuracy, anchor drift."""
    if record["step"] % 8 and record["step"] != steps:
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


def evaluate_adapter(session: Session, user: User, adapter_dir: Path, phase: str) -> Record:
    """Judge the adapter's answers on the phase's slice; knowledge; pairs; HH (final only)."""
    model = load_adapter(session, adapter_dir)
    slice_name, scope = SLICE_OF_PHASE[phase], SCOPE_OF_PHASE[phase]
    tokenizer, config = session.tokenizer, session.config
    knowledge = {
        name: measures.mc_outcomes(model, tokenizer, questions)
        for name, questions in session.knowledge[scope].items()
    }
    record: Record = {
        "slice": slice_name,
        "knowledge": knowledge_record(session.base_knowledge[scope], knowledge),
        "preference": measures.pair_scores(
            model,
            session.encoded[user.name][slice_name],
            tokenizer.pad_token_id,
            config.score_batch_size,
        ).summary(),
        **judge_record(session, user, model, slice_name),
    }
    if phase == "final":
        alignment = {
            split: measures.alignment_outcomes(model, tokenizer, pairs, config)
            for split, pairs in session.alignment.items()
        }
        record["alignment"] = alignment_record(session, alignment)
    return record


def judge_record(session: Session, user: User, model: CausalLM, slice_name: str) -> Record:
    """The adapter's greedy answers judged against the base's: persona, fluency, rule."""
    base = session.base_slices[user.name][slice_name]
    answers = judged_answers(session, model, base.prompts)
    ids = [a.token_ids for a in answers]
    scores = persona_scores(
        session.base_model, session.tokenizer, base.prompts, ids, user.instruction
    )
    judged = _fluency(session, base.prompts, answers, slice_name)
    record: Record = {
        "persona": measures.persona_movement(base.persona, scores),
        "fluency": fluency_record(session, base, judged, slice_name),
        "answers": [a.text[:TEXT_KEPT] for a in answers],
        "answer_ids": [a.token_ids for a in answers],
        "base_answers": [a.text[:TEXT_KEPT] for a in base.answers],
    }
    if user.rule:
        record["rule"] = rule_record(
            user, [a.text for a in base.answers], [a.text for a in answers]
        )
    return record


def fluency_record(session: Session, base: BaseSlice, judged: Fluency, slice_name: str) -> Record:
    """The adapter's fluency against the base's on one slice, under FLUENCY_RULE."""
    base_degenerate = sum(base.degenerate) / max(1, len(base.degenerate))
    return {
        "rule": FLUENCY_RULE,
        "mean_nll": judged.mean_nll,
        "base_mean_nll": measures.mean(base.nll),
        "degenerate_fraction": judged.degenerate_fraction,
        "base_degenerate_fraction": base_degenerate,
        "nll_bound": session.nll_bound[slice_name].to_json(),
        "ok": judged.degenerate_fraction <= base_degenerate + FLUENCY_MARGIN,
        "nll": judged.nll,
        "tokens": judged.tokens,
        "degenerate": [int(d) for d in judged.degenerate],
        "base_degenerate": [int(d) for d in base.degenerate],
    }


def rejudge_fluency(session: Session, record: Record) -> Record:
    """A record judged under an older fluency rule, judged again under FLUENCY_RULE from its
    recorded answers (no training or generation): the answers' token ids when recorded, else
    their text re-encoded the way the template writes an assistant turn."""
    if record["fluency"].get("rule") == FLUENCY_RULE:
        return record
    user = session.user(record["user"])
    base = session.base_slices[user.name][record["slice"]]
    if "answer_ids" in record:
        recorded = zip(record["answers"], record["answer_ids"], strict=True)
        answers = [Generation(text, ids, True) for text, ids in recorded]
        source = "recorded token ids"
    else:
        answers = [
            Generation(text, encode_response(session.tokenizer, messages, text, 10**6), True)
            for messages, text in zip(base.prompts, record["answers"], strict=True)
        ]
        source = "answer text re-encoded (recorded before token ids were kept)"
    judged = _fluency(session, base.prompts, answers, record["slice"])
    fluency = {**fluency_record(session, base, judged, record["slice"]), "rejudged": source}
    return {**record, "fluency": fluency}


def knowledge_record(
    base: dict[str, measures.MCOutcomes], outcomes: dict[str, measures.MCOutcomes]
) -> Record:
    """Per kept set and pooled: accuracy, change vs base with its paired stderr, the hits."""
    record: Record = {}
    pooled_base: list[float] = []
    pooled: list[float] = []
    for name, result in outcomes.items():
        base_hits = base[name].hits
        record[name] = {
            **result.result().to_dict(),
            **_change(measures.paired_change(base_hits, result.hits)),
            "hits": "".join(str(int(h)) for h in result.hits),
        }
        pooled_base += base_hits
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


def alignment_record(session: Session, outcomes: dict[str, list[float]]) -> Record:
    """HH-RLHF: fraction preferring the human-preferred answer, and its change vs base."""
    record: Record = {}
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


def rule_record(user: User, base_texts: list[str], texts: list[str]) -> Record:
    """The user's text rule on the adapter's answers vs the base model's on the same prompts."""
    assert user.rule is not None
    rule = measures.RULES[user.rule]
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
    }
