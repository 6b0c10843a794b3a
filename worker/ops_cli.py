"""Operator subcommands of `bapo` (they use the service's database and broker settings)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ADMIN_HELP = "(operator) uses DATABASE_URL / BROKER_URL / DATA_DIR like the service"


def add_operator_commands(subparsers: Any) -> None:
    """Register the operator subcommands on the `bapo` parser."""
    p = subparsers.add_parser("create-user", help=f"create a user, print its key {ADMIN_HELP}")
    p.add_argument("--id", dest="user_id", default=None, help="user id (generated if absent)")
    p.set_defaults(handler=_create_user)
    p = subparsers.add_parser(
        "list-users", help=f"users, pair counts, adapter versions {ADMIN_HELP}"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_list_users)
    p = subparsers.add_parser("retrain-due", help=f"enqueue due retrains now {ADMIN_HELP}")
    p.set_defaults(handler=_retrain_due)
    p = subparsers.add_parser("gc-adapters", help=f"delete unneeded adapter versions {ADMIN_HELP}")
    p.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    p.set_defaults(handler=_gc_adapters)
    p = subparsers.add_parser(
        "link-adapters", help=f"link every version by name for vLLM's resolver {ADMIN_HELP}"
    )
    p.set_defaults(handler=_link_adapters)
    p = subparsers.add_parser("export-user", help=f"write a user's data as JSON {ADMIN_HELP}")
    p.add_argument("--id", dest="user_id", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(handler=_export_user)
    p = subparsers.add_parser("import-user", help=f"create a user from an export {ADMIN_HELP}")
    p.add_argument("--file", type=Path, required=True)
    p.add_argument("--id", dest="user_id", default=None, help="import under this id instead")
    p.set_defaults(handler=_import_user)
    _add_key_commands(subparsers)


def _add_key_commands(subparsers: Any) -> None:
    """issue-key, list-keys, revoke-key: a user's API keys (their data is never touched)."""
    p = subparsers.add_parser("issue-key", help=f"issue a user another API key {ADMIN_HELP}")
    p.add_argument("--id", dest="user_id", required=True)
    p.add_argument("--name", default=None, help="a label, e.g. where the key is used")
    p.set_defaults(handler=_issue_key)
    p = subparsers.add_parser("list-keys", help=f"a user's keys, prefix only {ADMIN_HELP}")
    p.add_argument("--id", dest="user_id", required=True)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_list_keys)
    p = subparsers.add_parser("revoke-key", help=f"revoke one of a user's keys {ADMIN_HELP}")
    p.add_argument("--id", dest="user_id", required=True)
    p.add_argument("--key-id", type=int, required=True, help="the key's id (from list-keys)")
    p.set_defaults(handler=_revoke_key)


def _session_scope() -> Any:
    from app.core.config import get_settings
    from app.core.db import transaction
    from worker.jobs import session_factory

    return transaction(session_factory(get_settings()))


def _create_user(args: argparse.Namespace) -> int:
    from app.services import users as user_service

    with _session_scope() as session:
        user, key = user_service.create_user(session, args.user_id)
    print(json.dumps({"id": user.id, "api_key": key}))
    return 0


def _list_users(args: argparse.Namespace) -> int:
    from app.services import operations

    with _session_scope() as session:
        rows = operations.list_users(session)
    if args.json:
        print(json.dumps([row.__dict__ for row in rows]))
        return 0
    print(f"{'user':<32} {'pairs':>7} {'active':>7}  versions")
    for row in rows:
        active = f"v{row.active_version}" if row.active_version else "-"
        versions = ",".join(f"v{v}" for v in row.versions) or "-"
        print(f"{row.id:<32} {row.pair_count:>7} {active:>7}  {versions}")
    return 0


def _retrain_due(_args: argparse.Namespace) -> int:
    from app.core.config import get_settings
    from worker.schedule import enqueue_due_retrains

    job_ids = enqueue_due_retrains(get_settings())
    print(json.dumps({"enqueued": job_ids}))
    return 0


def _gc_adapters(args: argparse.Namespace) -> int:
    from app.core.config import get_settings
    from app.services import operations

    with _session_scope() as session:
        collected = operations.collect_adapters(
            session, get_settings().adapter_store, dry_run=args.dry_run
        )
    print(
        json.dumps(
            {
                "dry_run": args.dry_run,
                "collected": {u: [f"v{v}" for v in vs] for u, vs in collected.items()},
            }
        )
    )
    return 0


def _link_adapters(args: argparse.Namespace) -> int:
    from app.core.config import get_settings
    from app.services import operations

    with _session_scope() as session:
        linked, missing = operations.link_adapters(session, get_settings().adapter_store)
    print(json.dumps({"linked": linked, "missing_files": missing}))
    return 0


def _export_user(args: argparse.Namespace) -> int:
    from app.services import operations

    with _session_scope() as session:
        document = operations.export_user(session, args.user_id)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(document, ensure_ascii=False, indent=1))
    tmp.replace(args.out)
    print(json.dumps({"id": args.user_id, "pairs": len(document["pairs"]), "out": str(args.out)}))
    return 0


def _import_user(args: argparse.Namespace) -> int:
    from app.core.config import get_settings
    from app.services import operations

    try:
        document = json.loads(args.file.read_text())
    except (OSError, ValueError) as exc:
        print(f"bapo import-user: error: cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    with _session_scope() as session:
        user_id, key, count = operations.import_user(
            session, document, args.user_id, get_settings().pair_limits
        )
    print(json.dumps({"id": user_id, "api_key": key, "pairs": count}))
    return 0


def _key_fields(row: Any) -> dict[str, Any]:
    """A key as list-keys prints it: never the secret or its hash."""
    dates = {k: getattr(row, k) for k in ("created_at", "last_used_at")}
    return {
        "id": row.id,
        "user_id": row.user_id,
        "prefix": row.prefix,
        "name": row.name,
        **{k: v.isoformat() if v is not None else None for k, v in dates.items()},
    }


def _issue_key(args: argparse.Namespace) -> int:
    from app.services import api_keys

    with _session_scope() as session:
        row, secret = api_keys.issue_key(session, args.user_id, args.name)
        issued = _key_fields(row)
    print(json.dumps({**issued, "api_key": secret}))
    return 0


def _list_keys(args: argparse.Namespace) -> int:
    from app.services import api_keys

    with _session_scope() as session:
        rows = [_key_fields(row) for row in api_keys.all_keys(session, args.user_id)]
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'id':>8}  {'prefix':<14} {'created':<20} {'last used':<20} name")
    for row in rows:
        created, used = (str(row[k] or "-")[:19] for k in ("created_at", "last_used_at"))
        print(f"{row['id']:>8}  {row['prefix']:<14} {created:<20} {used:<20} {row['name'] or ''}")
    return 0


def _revoke_key(args: argparse.Namespace) -> int:
    from app.services import api_keys

    with _session_scope() as session:
        left = api_keys.revoke_key(session, args.user_id, args.key_id)
    print(json.dumps({"id": args.user_id, "revoked": args.key_id, "keys_left": left}))
    if left == 0:
        print(
            f"{args.user_id} has no API key left; `bapo issue-key --id {args.user_id}` issues one",
            file=sys.stderr,
        )
    return 0
