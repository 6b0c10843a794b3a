"""The preference pair: its one type, its one validator, and the hash of its prompt.

Every way a pair comes in — `POST /users/<id>/feedback` and its JSONL import, `/v1/files`,
`bapo import-user`, `bapo train` — checks it with `check_pair` (behind `pair_from_dict` for plain
JSON objects, which also reads OpenAI's and TRL's preference formats), so a pair one of them
refuses, all of them refuse, with the same message. The message starts with the name of the bad
field as the input called it (`prompt`, `messages.2.content`, `pairs.0.chosen`, ...).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any

Messages = list[dict[str, str]]
Metadata = dict[str, Any] | None
ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system turn


class PairError(ValueError):
    """A preference pair (or the file holding it) is malformed; `code` says how, `field` where."""

    def __init__(self, message: str, code: str = "invalid_pair", name: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = name


@dataclass
class Pair:
    """One preference: chat turns ending with a user turn, the chosen and the rejected response."""

    messages: Messages
    chosen: str
    rejected: str
    metadata: dict[str, Any] | None = None  # the caller's own, stored with the pair; never trained


@dataclass(frozen=True)
class PairLimits:
    """How large a pair may be (the service's MAX_TEXT_CHARS, MAX_MESSAGES, MAX_METADATA_BYTES)."""

    max_text_chars: int = 8000
    max_messages: int = 64
    max_metadata_bytes: int = 4096


@dataclass(frozen=True)
class PairFields:
    """What the input that carried a pair calls its parts; error messages name them so."""

    messages: str = "messages"  # the prompt's turns: "prompt", "input.messages", ...
    chosen: str = "chosen"
    rejected: str = "rejected"
    prompt_text: bool = False  # the input gave one prompt text (the turn is named `messages`)

    def content(self, index: int) -> str:
        """The name of turn `index`'s text: the prompt itself, or `<messages>.<index>.content`."""
        if self.prompt_text:
            return self.messages
        return f"{self.messages}.{index}.content"

    def under(self, prefix: str) -> PairFields:
        """The same names inside a container, e.g. `pairs.3.`."""
        return replace(
            self,
            messages=prefix + self.messages,
            chosen=prefix + self.chosen,
            rejected=prefix + self.rejected,
        )


def prompt_hash(messages: Messages) -> str:
    """sha256 of the canonical JSON of the chat turns: the prompt's one identity.

    Stored with each pair (`preference_pairs.prompt_hash`), and the key of the engine's caches
    and of its held-out split by prompt.
    """
    canonical = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def check_pair(pair: Pair, limits: PairLimits, fields: PairFields = PairFields()) -> Pair:
    """Return the pair if the service may store and train on it, else raise PairError."""
    _check_messages(pair.messages, fields, limits)
    _check_text(pair.chosen, fields.chosen, limits)
    _check_text(pair.rejected, fields.rejected, limits)
    if pair.chosen.strip() == pair.rejected.strip():
        raise PairError(
            f"{fields.chosen}: chosen and rejected are identical",
            "identical_responses",
            fields.chosen,
        )
    if pair.metadata is not None:
        raw = json.dumps(pair.metadata, ensure_ascii=False).encode("utf-8", "surrogatepass")
        if len(raw) > limits.max_metadata_bytes:
            raise PairError(
                f"metadata: larger than {limits.max_metadata_bytes} bytes",
                "metadata_too_large",
                "metadata",
            )
    return pair


def _check_messages(messages: Messages, fields: PairFields, limits: PairLimits) -> None:
    """The prompt's turns: some, not too many, the last one the user's, each a valid text."""
    name = fields.messages
    if not messages:
        raise PairError(f"{name}: at least one message is needed", "empty_messages", name)
    if len(messages) > limits.max_messages:
        raise PairError(
            f"{name}: at most {limits.max_messages} messages", "too_many_messages", name
        )
    if messages[-1]["role"] != "user":
        raise PairError(f"{name}: the last message must be a user turn", "last_turn_not_user", name)
    for i, message in enumerate(messages):
        _check_text(message["content"], fields.content(i), limits)


def _check_text(text: str, name: str, limits: PairLimits) -> None:
    """One text: not blank, not too long, no NUL, encodable as UTF-8."""
    if not text.strip():
        raise PairError(f"{name}: must not be empty", "empty_text", name)
    if len(text) > limits.max_text_chars:
        raise PairError(
            f"{name}: longer than {limits.max_text_chars} characters", "text_too_long", name
        )
    if "\x00" in text:
        raise PairError(f"{name}: must not contain NUL characters", "invalid_text", name)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates from \ud800-style JSON escapes
        raise PairError(f"{name}: not valid Unicode text", "invalid_text", name) from exc


def pair_from_dict(data: Any, limits: PairLimits = PairLimits(), where: str = "") -> Pair:
    """Read and check one pair given as a JSON object, in any of the shapes people have:

    - ours: `{"prompt"|"messages", "chosen", "rejected"[, "metadata"]}`;
    - TRL's preference format, plain (`prompt`/`chosen`/`rejected` texts, as ours) or
      conversational (`prompt` a list of turns, `chosen`/`rejected` lists of one assistant
      turn), and its implicit-prompt form (`chosen`/`rejected` whole conversations that share
      every turn but the last);
    - OpenAI's preference (DPO) fine-tuning line: `{"input": {"messages", "tools",
      "parallel_tool_calls"}, "preferred_output", "non_preferred_output"}`, with `developer`
      turns read as system turns and content given as a text or a list of text parts.

    Tools, tool calls and non-text content cannot be trained on and are refused by name.
    `where` locates the pair in a larger document (e.g. `pairs.3.`): it prefixes every message.
    """
    try:
        pair, fields = _read_pair(data)
    except PairError as exc:
        if not where:
            raise
        field = where + exc.field if exc.field else None
        raise PairError(f"{where.rstrip('.')}: {exc}", exc.code, field) from exc
    return check_pair(pair, limits, fields.under(where))


def _read_pair(data: Any) -> tuple[Pair, PairFields]:
    """The pair in a JSON object, structurally checked, and the names the object gives its parts."""
    if not isinstance(data, dict):
        raise PairError("a pair must be a JSON object")
    metadata = data.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise PairError("'metadata' must be a JSON object", name="metadata")
    if "input" in data or "preferred_output" in data:
        return _read_openai(data, metadata)
    if "prompt" in data and "messages" in data:
        raise PairError("a pair needs exactly one of 'prompt' or 'messages'")
    if "prompt" in data or "messages" in data:
        return _read_prompted(data, metadata)
    if isinstance(data.get("chosen"), list) and isinstance(data.get("rejected"), list):
        return _read_implicit_prompt(data, metadata)
    raise PairError("a pair needs exactly one of 'prompt' or 'messages' (or OpenAI's 'input')")


def _read_prompted(data: dict[str, Any], metadata: Metadata) -> tuple[Pair, PairFields]:
    """Ours and TRL's explicit-prompt forms: a prompt text or turns; texts or one-turn lists."""
    name = "prompt" if "prompt" in data else "messages"
    prompt = data[name]
    if isinstance(prompt, str):
        messages, fields = [{"role": "user", "content": prompt}], PairFields(name, prompt_text=True)
    else:
        messages, fields = _turns(prompt, name), PairFields(name)
    chosen, rejected = _response(data, "chosen"), _response(data, "rejected")
    return Pair(messages, chosen, rejected, metadata), fields


def _read_implicit_prompt(data: dict[str, Any], metadata: Metadata) -> tuple[Pair, PairFields]:
    """TRL's implicit prompt: two conversations, the same up to their last (assistant) turns."""
    chosen, rejected = _turns(data["chosen"], "chosen"), _turns(data["rejected"], "rejected")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if len(turns) < 2 or turns[-1]["role"] != "assistant":
            raise PairError(
                f"{name}: without a 'prompt', must be a conversation ending with an assistant turn",
                "invalid_response",
                name,
            )
    if chosen[:-1] != rejected[:-1]:
        raise PairError(
            "rejected: must have the same turns as 'chosen' before its last one",
            "prompt_mismatch",
            "rejected",
        )
    pair = Pair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], metadata)
    return pair, PairFields("chosen")


def _read_openai(data: dict[str, Any], metadata: Metadata) -> tuple[Pair, PairFields]:
    """OpenAI's (and Together's) preference line; tool definitions are refused."""
    given = data.get("input")
    if not isinstance(given, dict):
        raise PairError("'input' must be a JSON object with 'messages'", name="input")
    if given.get("tools") not in (None, []):
        raise PairError(
            "input.tools: tool definitions cannot be trained on; send [] or leave it out",
            "tools_unsupported",
            "input.tools",
        )
    messages = _turns(given.get("messages"), "input.messages")
    chosen = _output(data.get("preferred_output"), "preferred_output")
    rejected = _output(data.get("non_preferred_output"), "non_preferred_output")
    fields = PairFields("input.messages", "preferred_output", "non_preferred_output")
    return Pair(messages, chosen, rejected, metadata), fields


def _response(data: dict[str, Any], name: str) -> str:
    """`chosen`/`rejected`: a text, or (TRL conversational) a list of one assistant turn."""
    value = data.get(name)
    if isinstance(value, list):
        return _output(value, name)
    if not isinstance(value, str):
        raise PairError(f"'{name}' must be a non-empty string", name=name)
    return value


def _output(value: Any, name: str) -> str:
    """The text of a one-turn list holding the assistant's answer."""
    if not isinstance(value, list) or len(value) != 1:
        raise PairError(f"{name}: must be a list of exactly one assistant message", name=name)
    turn = _turn(value[0], f"{name}.0")
    if turn["role"] != "assistant":
        raise PairError(f"{name}.0.role: must be 'assistant'", "invalid_role", name)
    return turn["content"]


def _turns(value: Any, name: str) -> Messages:
    """Chat turns, structurally: a non-empty list of turns with known roles and text contents."""
    if not isinstance(value, list) or not value:
        raise PairError(f"'{name}' must be a non-empty list", name=name)
    return [_turn(turn, f"{name}.{i}") for i, turn in enumerate(value)]


def _turn(turn: Any, name: str) -> dict[str, str]:
    """One turn as `{"role", "content"}`: `developer` read as system, text parts joined."""
    if not isinstance(turn, dict):
        raise PairError(f"{name}: each message must be a JSON object", name=name)
    role = turn.get("role")
    role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
    if role == "tool" or turn.get("tool_calls") or turn.get("function_call"):
        raise PairError(
            f"{name}: tool calls and tool results cannot be trained on",
            "tools_unsupported",
            name,
        )
    if role not in ROLES:
        raise PairError(
            f"{name}.role: each message needs a role in {(*ROLES, *ROLE_ALIASES)}", name=name
        )
    return {"role": str(role), "content": _content(turn.get("content"), f"{name}.content")}


def _content(content: Any, name: str) -> str:
    """A turn's text: a string, or a list of `{"type": "text", "text"}` parts (joined by "\\n",
    as vLLM joins them when it serves the prompt)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise PairError(
            f"{name}: each message needs a string 'content' or a list of text parts", name=name
        )
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise PairError(
                f"{name}.{i}: only text parts can be trained on (got type {kind!r})",
                "unsupported_content",
                f"{name}.{i}",
            )
        texts.append(part["text"])
    return "\n".join(texts)
