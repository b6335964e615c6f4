"""The ``matview`` command: the same YAML as the operator, without Kubernetes.

Database: ``--dsn``, else ``DATABASE_URL``, else an embedded PostgreSQL in
``.matview/pgdata`` that is started on first use and keeps running, so a
newcomer needs no database at all. Exit codes: 0 success, 2 invalid spec or
usage, 1 anything the database refused (message on stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matview import engine
from matview.errors import MatviewError, SpecError
from matview.spec import MaterializedView
from matview.validation import load_file

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
DEFAULT_EMBEDDED_DIR = Path(".matview/pgdata")


def _database_url(args: argparse.Namespace) -> str:
    if args.dsn:
        return str(args.dsn)
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    from matview.localpg import ensure_embedded

    dsn = ensure_embedded(Path(args.embedded_dir))
    print(
        f"using the embedded PostgreSQL in {args.embedded_dir} ({dsn}); stop it with 'matview embedded-stop'",
        file=sys.stderr,
    )
    return dsn


def _load(paths: Sequence[str]) -> list[MaterializedView]:
    views: list[MaterializedView] = []
    for path in paths:
        views += load_file(path)
    return views


def _emit(args: argparse.Namespace, results: list[dict[str, Any]], human: Callable[[dict[str, Any]], str]) -> None:
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            print(human(result))


def cmd_validate(args: argparse.Namespace) -> int:
    views = _load(args.files)
    results = [{"resource": v.owner, "relation": v.relation, "valid": True} for v in views]
    _emit(args, results, lambda r: f"{r['resource']}: valid ({r['relation']})")
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    views = _load(args.files)
    results = []
    with engine.connect(_database_url(args)) as conn:
        for view in views:
            current = engine.plan(conn, view)
            results.append(
                {
                    "resource": view.owner,
                    "relation": view.relation,
                    "reasons": list(current.reasons),
                    "warnings": list(current.warnings),
                    "steps": [
                        {
                            "description": s.description,
                            "transactional": s.transactional,
                            "sql": [st.as_string(conn) for st in s.statements],
                        }
                        for s in current.steps
                    ],
                }
            )

    def human(r: dict[str, Any]) -> str:
        if not r["steps"]:
            return f"{r['relation']}: up to date, nothing to do"
        lines = [f"{r['relation']}: {len(r['steps'])} step(s) ({'; '.join(r['reasons'])})"]
        lines += [f"  warning: {w}" for w in r["warnings"]]
        for step in r["steps"]:
            lines.append(f"  -- {step['description']}")
            lines += [f"  {statement};" for statement in step["sql"]]
        return "\n".join(lines)

    _emit(args, results, human)
    return EXIT_OK


def _run_each(args: argparse.Namespace, operation: Callable[..., engine.ApplyResult], verb: str) -> int:
    views = _load(args.files)
    results = []
    with engine.connect(_database_url(args)) as conn:
        for view in views:
            result = operation(conn, view)
            results.append(
                {
                    "resource": view.owner,
                    "relation": view.relation,
                    "changed": result.changed,
                    "steps": result.done,
                    "reasons": list(result.plan.reasons),
                    "warnings": list(result.plan.warnings),
                }
            )

    def human(r: dict[str, Any]) -> str:
        if not r["changed"]:
            return f"{r['relation']}: {'; '.join(r['reasons']) or 'up to date'}"
        return "\n".join(
            [f"{r['relation']}: {verb}", *(f"  - {s}" for s in r["steps"]), *(f"  warning: {w}" for w in r["warnings"])]
        )

    _emit(args, results, human)
    return EXIT_OK


def cmd_apply(args: argparse.Namespace) -> int:
    return _run_each(args, engine.apply, "applied")


def cmd_delete(args: argparse.Namespace) -> int:
    return _run_each(args, engine.delete, "deleted")


def cmd_embedded_stop(args: argparse.Namespace) -> int:
    from matview.localpg import stop_embedded

    print("stopped" if stop_embedded(Path(args.embedded_dir)) else "no embedded PostgreSQL was running")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matview", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], text: str, files: bool = True, database: bool = True
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(handler=handler)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if files:
            p.add_argument("files", nargs="+", metavar="FILE", help="MaterializedView YAML file(s)")
        if database:
            p.add_argument("--dsn", help="libpq connection string or URI (default: $DATABASE_URL, else embedded)")
        p.add_argument("--embedded-dir", default=str(DEFAULT_EMBEDDED_DIR), help=argparse.SUPPRESS)
        return p

    command("validate", cmd_validate, "check files without touching any database", database=False)
    command("plan", cmd_plan, "print the SQL apply would run; changes nothing")
    command("apply", cmd_apply, "make the database match the files")
    command("delete", cmd_delete, "delete per deletionPolicy (Retain keeps everything)")
    command("embedded-stop", cmd_embedded_stop, "stop the embedded PostgreSQL", files=False, database=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except SpecError as exc:
        print(f"invalid: {exc.source + ': ' if exc.source else ''}", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return EXIT_INVALID
    except MatviewError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:
        import psycopg

        if isinstance(exc, psycopg.Error):
            print(f"error: database: {exc}", file=sys.stderr)
            return EXIT_FAILED
        raise


if __name__ == "__main__":
    sys.exit(main())
