"""API keys: generation, hashing, and who a request is."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from app.core.errors import Forbidden, InvalidRequest

KEY_PREFIX = "bapo_"
USER_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the operator, or one user."""

    is_operator: bool
    user_id: str | None = None

    def authorize_user(self, user_id: str) -> None:
        """Raise unless this principal may act on `user_id`."""
        if not self.is_operator and not hmac.compare_digest(self.user_id or "", user_id):
            raise Forbidden("This API key does not belong to this user", "wrong_user")

    def require_operator(self) -> None:
        """Raise unless this principal is the operator."""
        if not self.is_operator:
            raise Forbidden("This action needs the operator key", "operator_only")


def generate_api_key() -> str:
    """A new random user key (256 bits of entropy)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """Keys are stored as SHA-256: they are random, so a slow hash would add nothing."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def keys_equal(a: str, b: str) -> bool:
    """Constant-time comparison of two keys."""
    return hmac.compare_digest(hash_key(a), hash_key(b))


def validate_user_id(user_id: str) -> str:
    """Check a user id: [A-Za-z0-9_.-]{1,64}, and not '.' or '..' (it names a folder)."""
    if not USER_ID_RE.fullmatch(user_id) or set(user_id) == {"."}:
        raise InvalidRequest(
            "user id must be 1-64 characters of A-Z a-z 0-9 _ . - and not only dots",
            "invalid_user_id",
            param="user_id",
        )
    return user_id


def load_or_create_operator_key(data_dir: Path) -> tuple[str, bool]:
    """The operator key kept in DATA_DIR/operator_key (created on first start); (key, created)."""
    path = data_dir / "operator_key"
    if path.exists():
        return path.read_text().strip(), False
    data_dir.mkdir(parents=True, exist_ok=True)
    key = "op_" + secrets.token_urlsafe(32)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(key + "\n")
    tmp.chmod(0o600)
    tmp.replace(path)
    return key, True
