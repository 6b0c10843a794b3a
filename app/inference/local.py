"""In-process backend: transformers + PEFT in the API process (the embedded default).

torch, transformers and peft are imported lazily, inside the functions that need them, so the API
imports none of them unless this backend is chosen and used. One base model is loaded once; user
adapters live on ONE PeftModel in an LRU of `max_adapters` entries. All model work (loading, adapter
switching, generation) runs on a single dedicated thread: that thread is the lock that makes
concurrent requests safe, and it keeps blocking work off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from app.core.errors import ServiceUnavailable
from app.inference.base import (
    AdapterLoadObserver,
    AdapterRef,
    GeneratedText,
    GenerationRequest,
    GenerationResult,
    ResponseFormat,
    StreamDelta,
    TokenLogprob,
)
from app.inference.batching import Batcher, BatchItem, batch_key
from app.inference.stacked_lora import stacked_lora
from foundation.model import default_device, load_model, load_tokenizer

log = logging.getLogger(__name__)
T = TypeVar("T")
BASE_ROW = "__base__"  # PEFT's name for a batch row on the base model


class LocalBackend:
    """transformers + PEFT on this machine: concurrent requests batched on one model thread."""

    def __init__(
        self,
        model_dir: Callable[[], Path],
        max_adapters: int,
        probe: Callable[[], tuple[bool, str]] | None = None,
        threads: int = 0,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
    ) -> None:
        self._model_dir = model_dir
        self.on_adapter_load: AdapterLoadObserver | None = None
        self._probe = probe
        self._max_adapters = max_adapters
        self._threads = threads
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-inference")
        self._engine: LocalEngine | None = None
        self._batcher = Batcher(self._run_batch, max_batch, max_queue, max_adapters)

    async def generate(
        self, request: GenerationRequest, adapter: AdapterRef | None
    ) -> GenerationResult:
        """Generate the whole answer on the model thread (in a batch when it can share one)."""
        engine = await self._loaded_engine()
        if batch_key(request) is None:
            return await self._on_model_thread(engine.generate, request, adapter, None, None)
        item = BatchItem(request, adapter, asyncio.get_running_loop())
        self._batcher.submit(item)
        try:
            return await item.result
        finally:
            self._abandon(item)

    async def stream(
        self, request: GenerationRequest, adapter: AdapterRef | None
    ) -> AsyncIterator[StreamDelta]:
        """Stream the answer: from its batch row, or alone through transformers' streamer."""
        if batch_key(request) is not None:
            async for delta in self._stream_in_batch(request, adapter):
                yield delta
            return
        from transformers import AsyncTextIteratorStreamer

        engine = await self._loaded_engine()
        streamer = AsyncTextIteratorStreamer(
            engine.tokenizer, skip_prompt=True, skip_special_tokens=True
        )
        cancel = threading.Event()
        job = asyncio.get_running_loop().run_in_executor(
            self._executor, engine.generate, request, adapter, streamer, cancel
        )
        trimmer = StopTrimmer(request.stop)
        try:
            async for piece in streamer:
                text = trimmer.feed(piece)
                if text:
                    yield StreamDelta(text)
            result = await job
        finally:
            cancel.set()  # a client that went away stops the generation at the next token
            job.cancel()  # or, if it is still queued, before it starts
        yield StreamDelta(
            trimmer.flush(), result.finish_reason, result.prompt_tokens, result.completion_tokens
        )

    async def _stream_in_batch(
        self, request: GenerationRequest, adapter: AdapterRef | None
    ) -> AsyncIterator[StreamDelta]:
        """The pieces of one batch row as they come, then its end."""
        await self._loaded_engine()
        item = BatchItem(request, adapter, asyncio.get_running_loop(), streaming=True)
        self._batcher.submit(item)
        trimmer = StopTrimmer(request.stop)
        try:
            while (piece := await item.pieces.get()) is not None:
                text = trimmer.feed(piece)
                if text:
                    yield StreamDelta(text)
            result = await item.result
        finally:
            self._abandon(item)
        yield StreamDelta(
            trimmer.flush(), result.finish_reason, result.prompt_tokens, result.completion_tokens
        )

    def _abandon(self, item: BatchItem) -> None:
        """A caller that stopped waiting: drop its row from the queue, or stop it in its batch."""
        if not item.result.done():
            item.cancel.set()  # its row stops at the next token
            self._batcher.withdraw(item)  # or it never starts

    async def _run_batch(self, batch: list[BatchItem]) -> None:
        """One batch on the model thread; the engine settles each item."""
        engine = await self._loaded_engine()
        await self._on_model_thread(engine.generate_batch, batch)

    async def ready(self) -> tuple[bool, str]:
        """Ready when the model is loaded, or (per `probe`) can be loaded on first use."""
        if self._engine is not None:
            return True, f"local: model loaded, {len(self._engine.adapters)} adapter(s) in memory"
        if self._probe is None:
            return True, "local: model loads on first request"
        return await asyncio.to_thread(self._probe)

    async def loaded_adapters(self) -> set[str]:
        """Adapters now on the model."""
        return set(self._engine.adapters) if self._engine is not None else set()

    async def unload(self, adapter_name: str) -> None:
        """Delete the adapter from the model, after the requests queued before this call."""
        if self._engine is not None:
            await self._on_model_thread(self._engine.drop, adapter_name)

    async def aclose(self) -> None:
        """Stop the model thread and let the model be garbage-collected."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._engine = None

    async def _loaded_engine(self) -> LocalEngine:
        """The engine, loading the base model on first use (on the model thread)."""
        if self._engine is None:
            engine = await self._on_model_thread(self._load_once)
            self._engine = engine
        return self._engine

    def _load_once(self) -> LocalEngine:
        """Load the model unless an earlier queued call already did (runs on the model thread)."""
        if self._engine is not None:
            return self._engine
        try:
            engine = LocalEngine(self._model_dir(), self._max_adapters, self._threads)
        except OSError as exc:  # ModelNotFoundError included: no folder, no bundled package
            raise ServiceUnavailable(
                f"The base model could not be loaded: {exc}", "model_unavailable"
            ) from exc
        engine.on_adapter_load = self.on_adapter_load
        return engine

    async def _on_model_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the single model thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


class LocalEngine:
    """The loaded model, tokenizer and adapter LRU. Only ever used from the model thread."""

    def __init__(self, model_dir: Path, max_adapters: int, threads: int = 0) -> None:
        import torch

        self.on_adapter_load: AdapterLoadObserver | None = None
        if threads:
            # Small models decode faster on one thread when cores are shared (measured 7x).
            torch.set_num_threads(threads)
        self.tokenizer: Any = load_tokenizer(model_dir)  # the engine's: its padding is unused here
        self.device = default_device()  # CUDA when there is one, else the CPU
        self.base: Any = load_model(model_dir, self.device)  # eval mode, the dtype training uses
        self.peft: Any = None  # the PeftModel wrapping `base`, once an adapter is loaded
        self.adapters: OrderedDict[str, AdapterRef] = OrderedDict()
        self.max_adapters = max_adapters
        self._grammar_compiler: Any = None  # xgrammar's, built on the first JSON-mode request
        log.info("local inference: loaded %s on %s", model_dir, self.device)

    def generate(
        self,
        request: GenerationRequest,
        adapter: AdapterRef | None,
        streamer: Any | None,
        cancel: threading.Event | None,
    ) -> GenerationResult:
        """Generate for one request with `adapter` (None = base); feeds `streamer` if given."""
        import torch
        from transformers import StoppingCriteriaList

        # Greedy answers are all the same: generate one and repeat it, as vLLM's are identical.
        rows = 1 if request.greedy else request.n
        try:
            with self._selected(adapter) as model:
                inputs = self._inputs(request)
                if request.seed is not None:
                    torch.manual_seed(request.seed)
                with torch.inference_mode():
                    output = model.generate(
                        **inputs,
                        generation_config=self._generation_config(request, rows),
                        logits_processor=self._logits_processors(request),
                        streamer=streamer,
                        tokenizer=self.tokenizer,
                        stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]),
                    )
        finally:
            if streamer is not None:
                streamer.end()  # also when generation failed: the reader must not wait forever
        prompt_tokens = int(inputs["input_ids"].shape[1])
        choices = [self._choice(request, output, row, prompt_tokens) for row in range(rows)]
        return GenerationResult(tuple(choices * (request.n // rows)), prompt_tokens)

    def generate_batch(self, items: list[BatchItem]) -> None:
        """Run requests that share sampling settings as one batch, each with its own adapter.

        Rows are left-padded; each row stops at its own end of turn, max_tokens, stop string or
        cancellation. Settles every item (a failure fails them all).
        """
        import torch
        from transformers import StoppingCriteriaList

        requests = [item.request for item in items]
        names = self._load_batch_adapters([item.adapter for item in items])
        prompts = [self._prompt_ids(r) for r in requests]
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else _as_list(self.base.generation_config.eos_token_id)[0]
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        first = requests[0]
        config = self._generation_config(first, 1)
        config.max_new_tokens = max(r.max_tokens for r in requests)
        config.stop_strings = None  # per row, in _RowStops
        config.pad_token_id = pad
        stops = _RowStops(requests, [item.cancel for item in items], width, self.tokenizer)
        streamer = _RowStreamer(self.tokenizer, items, stops, self._eos_ids())
        mixed = any(item.adapter is not None for item in items)
        extra = {"adapter_names": names} if mixed else {}
        model = self.peft if mixed else None
        with contextlib.ExitStack() as stack:
            if model is None:
                model = stack.enter_context(self._selected(None))
            else:  # every row's LoRA in two batched matmuls per layer (PEFT's loop otherwise)
                stack.enter_context(stacked_lora(model, names))
            with torch.inference_mode():
                output = model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention.to(self.device),
                    generation_config=config,
                    logits_processor=self._logits_processors(first),
                    stopping_criteria=StoppingCriteriaList([stops]),
                    streamer=streamer if any(item.streaming for item in items) else None,
                    **extra,
                )
        for row, item in enumerate(items):
            choice = self._choice(item.request, output, row, width)
            item.finish(GenerationResult((choice,), len(prompts[row])))

    def _load_batch_adapters(self, adapters: list[AdapterRef | None]) -> list[str]:
        """Load a batch's adapters (the batcher keeps them within the LRU); PEFT's row names."""
        for adapter in adapters:
            if adapter is not None:
                self._ensure_loaded(adapter)
        return [adapter.name if adapter else BASE_ROW for adapter in adapters]

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids as a list (chat template, or the raw text)."""
        ids = self._inputs(request)["input_ids"][0]
        return [int(i) for i in ids.tolist()]

    def _eos_ids(self) -> set[int]:
        """The model's end-of-sequence token ids."""
        return set(_as_list(self.base.generation_config.eos_token_id))

    def _inputs(self, request: GenerationRequest) -> Any:
        """The prompt's token ids: the chat template for messages, plain text for a completion."""
        if request.prompt is not None:
            encoded = self.tokenizer(request.prompt, return_tensors="pt")
        else:
            encoded = self.tokenizer.apply_chat_template(
                request.messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        return encoded.to(self.device)

    def _logits_processors(self, request: GenerationRequest) -> Any:
        """Penalties, logit bias and the JSON grammar, then temperature and top-p, in that order.

        Sampling warpers are ours rather than generate()'s, which would run them first: a bias
        or a grammar must act on the whole distribution before top-p cuts it.
        """
        from transformers import (
            LogitsProcessorList,
            SequenceBiasLogitsProcessor,
            TemperatureLogitsWarper,
            TopPLogitsWarper,
        )

        processors: list[Any] = []
        if request.presence_penalty or request.frequency_penalty:
            processors.append(OpenAIPenalties(request.presence_penalty, request.frequency_penalty))
        if request.logit_bias:
            processors.append(
                SequenceBiasLogitsProcessor([[[token], bias] for token, bias in request.logit_bias])
            )
        if request.response_format is not None:
            processors.append(self._grammar(request.response_format))
        if not request.greedy:
            if request.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(request.temperature))
            if request.top_p < 1.0:
                processors.append(TopPLogitsWarper(request.top_p))
        return LogitsProcessorList(processors)

    def _grammar(self, response_format: ResponseFormat) -> Any:
        """A fresh xgrammar logits processor (one per generate call) for JSON output."""
        import xgrammar
        from xgrammar.contrib.hf import LogitsProcessor

        if self._grammar_compiler is None:
            info = xgrammar.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.base.config.vocab_size
            )
            self._grammar_compiler = xgrammar.GrammarCompiler(info)
        compiler = self._grammar_compiler
        if response_format.schema is None:
            compiled = compiler.compile_builtin_json_grammar()
        else:
            compiled = compiler.compile_json_schema(json.dumps(response_format.schema))
        return LogitsProcessor(compiled)

    def _choice(
        self, request: GenerationRequest, output: Any, row: int, prompt_tokens: int
    ) -> GeneratedText:
        """One answer: its tokens up to the end of turn, cut at a stop string, with log-probs."""
        eos = set(_as_list(self.base.generation_config.eos_token_id))
        tokens: list[int] = output.sequences[row, prompt_tokens:].tolist()
        ended = next((i for i, t in enumerate(tokens) if t in eos), None)
        if ended is not None:  # later positions of a batch row are padding
            tokens = tokens[: ended + 1]
        if len(tokens) > request.max_tokens:  # a batch row generated past its own limit
            tokens, ended = tokens[: request.max_tokens], None
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = first_stop(text, request.stop)
        if cut is not None:
            text = text[:cut]
        stopped = ended is not None or cut is not None or len(tokens) < request.max_tokens
        logprobs = None
        if request.logprobs is not None:
            shown = tokens[:ended] if ended is not None else tokens
            logprobs = self._logprobs(output.logits, row, shown, request.logprobs, len(text))
        return GeneratedText(text, "stop" if stopped else "length", len(tokens), logprobs)

    def _logprobs(
        self, logits: Any, row: int, tokens: list[int], top: int, text_length: int
    ) -> tuple[TokenLogprob, ...]:
        """Each shown token's log-probability under the model (raw, before sampling changes)."""
        import torch

        out: list[TokenLogprob] = []
        length = 0
        for step, token in enumerate(tokens):
            if length >= text_length:  # the rest was cut by a stop string
                break
            logp = torch.log_softmax(logits[step][row].float(), dim=-1)
            text = self.tokenizer.decode([token])
            best = torch.topk(logp, top).indices.tolist() if top else []
            alternatives = tuple((self.tokenizer.decode([i]), float(logp[i])) for i in best)
            out.append(TokenLogprob(text, float(logp[token]), alternatives))
            length += len(text)
        return tuple(out)

    def drop(self, name: str) -> None:
        """Delete an adapter from the model (no-op if it is not loaded)."""
        if self.adapters.pop(name, None) is None:
            return
        if self.adapters:
            self.peft.delete_adapter(name)
        else:
            # PEFT cannot generate with zero adapters: unwrap back to the plain base model.
            self.base = self.peft.unload()
            self.peft = None
        log.info("local inference: unloaded adapter %s", name)

    @contextlib.contextmanager
    def _selected(self, adapter: AdapterRef | None) -> Iterator[Any]:
        """The model to call with `adapter` active (None = base: adapters disabled)."""
        if adapter is None:
            if self.peft is None:
                yield self.base
            else:
                with self.peft.disable_adapter():
                    yield self.peft
            return
        self._ensure_loaded(adapter)
        self.peft.set_adapter(adapter.name)
        yield self.peft

    def _ensure_loaded(self, adapter: AdapterRef) -> None:
        """Load `adapter` unless present; evict the least recently used beyond the LRU size."""
        if adapter.name in self.adapters:
            self.adapters.move_to_end(adapter.name)
            return
        started = time.perf_counter()
        self._load_adapter(adapter)
        self.adapters[adapter.name] = adapter
        if self.on_adapter_load is not None:
            self.on_adapter_load(time.perf_counter() - started)
        while len(self.adapters) > self.max_adapters:
            self.drop(next(iter(self.adapters)))

    def _load_adapter(self, adapter: AdapterRef) -> None:
        """Add the adapter's weights to the PeftModel (creating it for the first adapter)."""
        from peft import PeftModel

        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(
                    self.base, str(adapter.path), adapter_name=adapter.name
                )
                self.peft.eval()
            else:
                self.peft.load_adapter(str(adapter.path), adapter_name=adapter.name)
        except (OSError, ValueError) as exc:
            raise ServiceUnavailable(
                f"Could not load adapter {adapter.name} from {adapter.path}: {exc}",
                "adapter_load_failed",
            ) from exc
        log.info("local inference: loaded adapter %s from %s", adapter.name, adapter.path)

    def _generation_config(self, request: GenerationRequest, rows: int) -> Any:
        """Greedy when temperature is 0, else sampling; nothing else is inherited.

        Temperature and top-p are left to `_logits_processors`, which applies them last.
        """
        config = copy.deepcopy(self.base.generation_config)
        config.max_new_tokens = request.max_tokens
        config.do_sample = not request.greedy
        config.num_return_sequences = rows
        config.temperature = None
        config.top_p = None
        config.top_k = None  # vLLM and OpenAI apply no top-k unless asked
        config.stop_strings = list(request.stop) or None
        config.return_dict_in_generate = True
        config.output_logits = request.logprobs is not None  # raw, as vLLM's logprobs are
        return config


class _RowStops:
    """Per-row stopping for a batch: its own max_tokens, stop strings, or its client gone."""

    def __init__(
        self,
        requests: list[GenerationRequest],
        cancels: list[threading.Event],
        width: int,
        tokenizer: Any,
    ) -> None:
        self.requests = requests
        self.cancels = cancels
        self.width = width
        self.tokenizer = tokenizer
        self.done = [False] * len(requests)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        generated = int(input_ids.shape[1]) - self.width
        for row, request in enumerate(self.requests):
            if self.done[row]:
                continue
            stopped = self.cancels[row].is_set() or generated >= request.max_tokens
            if not stopped and request.stop:
                text = self.tokenizer.decode(input_ids[row, self.width :], skip_special_tokens=True)
                stopped = first_stop(text, request.stop) is not None
            self.done[row] = stopped
        return torch.tensor(self.done, device=input_ids.device)


class _RowStreamer:
    """transformers' streamer protocol for a batch: each row's new text to its own item."""

    def __init__(
        self, tokenizer: Any, items: list[BatchItem], stops: _RowStops, eos: set[int]
    ) -> None:
        self.tokenizer = tokenizer
        self.items = items
        self.stops = stops
        self.eos = eos
        self.tokens: list[list[int]] = [[] for _ in items]
        self.sent = [0] * len(items)
        self.ended = [False] * len(items)
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # the first call carries the prompts
            self.prompt_seen = True
            return
        # generate() runs the stopping criteria before handing over the step's tokens: a row
        # that stopped at this step still gets this token; the padding after it is dropped.
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.ended[row]:
                continue
            if token in self.eos:
                self.ended[row] = True
                continue
            self.tokens[row].append(int(token))
            self._emit(row, final=False)
        self.ended = [e or d for e, d in zip(self.ended, self.stops.done, strict=True)]

    def end(self) -> None:
        for row in range(len(self.items)):
            self._emit(row, final=True)

    def _emit(self, row: int, *, final: bool) -> None:
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):  # half a character: wait for the rest
            return
        self.items[row].emit(text[self.sent[row] :])
        self.sent[row] = len(text)


class OpenAIPenalties:
    """OpenAI's presence and frequency penalties on the tokens generated so far (additive).

    logits[t] -= presence * [count(t) > 0] + frequency * count(t), as OpenAI and vLLM define them
    (transformers' repetition_penalty is multiplicative and counts the prompt: another thing).
    """

    def __init__(self, presence: float, frequency: float) -> None:
        self.presence = presence
        self.frequency = frequency
        self.prompt_length: int | None = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self.prompt_length is None:  # the first call sees only the prompt
            self.prompt_length = int(input_ids.shape[1])
        generated = input_ids[:, self.prompt_length :]
        counts = torch.zeros_like(scores)
        if generated.shape[1]:
            counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.presence * (counts > 0).to(scores.dtype) - self.frequency * counts


class _Cancelled:
    """A stopping criterion: stop when the request's cancel event is set."""

    def __init__(self, event: threading.Event | None) -> None:
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
        return self.event is not None and self.event.is_set()


class StopTrimmer:
    """Cuts streamed text at the first stop string, holding back what could begin one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text that is safe to send now."""
        if self.stopped:
            return ""
        self.pending += piece
        cut = first_stop(self.pending, self.stops)
        if cut is not None:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        keep = _partial_stop_length(self.pending, self.stops)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out) :]
        return out

    def flush(self) -> str:
        """What was held back, at the end of the generation."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index of the earliest stop string in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _partial_stop_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:size]):
                best = size
                break
    return best


def _as_list(value: int | list[int] | None) -> list[int]:
    """eos_token_id may be an int, a list, or None."""
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)
