"""The preference pair: its one type, its one validator, and the hash of its prompt.

Every way a pair comes in — `POST /users/<id>/feedback`, `bapo import-user`, `bapo train` — checks
it with `check_pair` (behind `pair_from_dict` for plain JSON objects), so a pair one of them
refuses, all of them refuse, with the same message. The message starts with the name of the bad
field as the input called it (`prompt`, `messages.2.content`, `pairs.0.chosen`, ...).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any

Messages = list[dict[str, str]]
ROLES = ("system", "user", "assistant")


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

    messages: str = "messages"  # "prompt" when the input gave one prompt text
    chosen: str = "chosen"
    rejected: str = "rejected"

    def content(self, index: int) -> str:
        """The name of turn `index`'s text: the prompt itself, or `<messages>.<index>.content`."""
        if self.messages.endswith("prompt"):
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
    """Read and check a `{"prompt"|"messages", "chosen", "rejected"[, "metadata"]}` object.

    `where` locates the pair in a larger document (e.g. `pairs.3.`): it prefixes every message.
    """
    try:
        pair = _read_pair(data)
    except PairError as exc:
        if not where:
            raise
        raise PairError(f"{where.rstrip('.')}: {exc}", exc.code, exc.field) from exc
    fields = PairFields(messages="prompt" if "prompt" in data else "messages")
    return check_pair(pair, limits, fields.under(where))


def _read_pair(data: Any) -> Pair:
    """The pair in a JSON object, checked for structure only (types, roles, one prompt form)."""
    if not isinstance(data, dict):
        raise PairError("a pair must be a JSON object")
    if ("prompt" in data) == ("messages" in data):
        raise PairError("a pair needs exactly one of 'prompt' or 'messages'")
    metadata = data.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise PairError("'metadata' must be a JSON object", name="metadata")
    return Pair(_messages_from(data), _string(data, "chosen"), _string(data, "rejected"), metadata)


def _string(data: dict[str, Any], name: str) -> str:
    """A required string field (check_pair then refuses a blank one)."""
    value = data.get(name)
    if not isinstance(value, str):
        raise PairError(f"'{name}' must be a non-empty string", name=name)
    return value


def _messages_from(data: dict[str, Any]) -> Messages:
    """The chat turns of a pair, structurally: a list of turns with known roles and string texts."""
    if "prompt" in data:
        return [{"role": "user", "content": _string(data, "prompt")}]
    messages = data["messages"]
    if not isinstance(messages, list) or not messages:
        raise PairError("'messages' must be a non-empty list", name="messages")
    for turn in messages:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            raise PairError(f"each message needs a role in {ROLES}", name="messages")
        if not isinstance(turn.get("content"), str):
            raise PairError("each message needs a string 'content'", name="messages")
    return [{"role": turn["role"], "content": turn["content"]} for turn in messages]
