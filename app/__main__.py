"""`python -m app`: serve the API (embedded defaults unless configured)."""

from __future__ import annotations

import uvicorn

from app.core.config import get_settings
from app.core.logging import configure_logging
from app.core.security import load_or_create_operator_key
from app.main import create_app


def main() -> None:
    """Print how to authenticate, then serve."""
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    app = create_app(settings)
    base = f"http://{settings.host}:{settings.port}"
    if settings.operator_key is None:
        key, _ = load_or_create_operator_key(settings.data_dir)
        where = f"(kept in {settings.data_dir / 'operator_key'})"
    else:
        key, where = "<OPERATOR_KEY>", "(from OPERATOR_KEY)"
    print(
        f"""
BAPO personalization service on {base}   (API docs: {base}/docs)
Database: {settings.database_url.split("@")[-1]}
Operator key {where}:
  {key}
Create a user:
  curl -s -X POST {base}/users -H 'Authorization: Bearer {key}' \\
       -H 'Content-Type: application/json' -d '{{"id": "alice"}}'
""",
        flush=True,
    )
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        proxy_headers=True,
        timeout_graceful_shutdown=10,
        timeout_keep_alive=settings.keep_alive_timeout_s,
    )


if __name__ == "__main__":
    main()
