"""The ``matview`` command: the same YAML as the operator, without Kubernetes.

Database: ``--dsn``, else ``DATABASE_URL``, else an embedded PostgreSQL in
``.matview/pgdata`` that is started on first use and keeps running, so a
newcomer needs no database at all. Exit codes: 0 success, 2 invalid spec or
usage, 1 anything the database refused (message on stderr).

This module is the command table (build_parser) and the entry point; the verbs live in one module per
group (views, serving, showcase, local_server) and share cli.common.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence

from matview.cli import arguments, control
from matview.cli.report import EXIT_FAILED, EXIT_INVALID
from matview.errors import MatviewError, SpecError

#: Each verb's function, imported when the verb runs: ``matview refresh`` first asks a running ``matview run``
#: (cli/control.py), and that needs none of the engine.
HANDLERS = {
    "validate": "views:cmd_validate",
    "plan": "views:cmd_plan",
    "apply": "views:cmd_apply",
    "delete": "views:cmd_delete",
    "refresh": "views:cmd_refresh",
    "verify": "views:cmd_verify",
    "page": "views:cmd_page",
    "run": "serving:cmd_run",
    "operator": "serving:cmd_operator",
    "demo": "showcase:cmd_demo",
    "compare": "showcase:cmd_compare",
    "embedded-stop": "local_server:cmd_embedded_stop",
    "embedded-clean": "local_server:cmd_embedded_clean",
}


def handler_of(command: str) -> Callable[[argparse.Namespace], int]:
    module, _, function = HANDLERS[command].partition(":")
    found: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(f"matview.cli.{module}"), function)
    return found


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default only when it has a meaningful one (not None, not an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from matview.api.spec import RefreshMode
    from matview.constants import DEFAULT_METRICS_PORT as DEFAULT_PORT
    from matview.refresh.settings import RunnerSettings

    parser = argparse.ArgumentParser(
        prog="matview",
        description="Declarative, safely refreshed PostgreSQL materialized views: the same YAML as the "
        "Kubernetes operator, without Kubernetes.",
        formatter_class=_HelpWithDefaults,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str, files: bool = True, database: bool = True) -> argparse.ArgumentParser:
        assert name in HANDLERS, name
        p = sub.add_parser(name, help=text, description=text, formatter_class=_HelpWithDefaults)
        arguments.add_view_arguments(p, files=files, database=database)
        return p

    command("validate", "check files without touching any database", database=False)
    allow_superuser = "accept a spec.runAsRole that is a superuser (refused by default: its queries could do anything)"
    command("plan", "print the SQL apply would run; changes nothing").add_argument(
        "--allow-superuser-run-as-role", action="store_true", help=allow_superuser
    )
    command("apply", "make the database match the files").add_argument(
        "--allow-superuser-run-as-role", action="store_true", help=allow_superuser
    )
    command("delete", "delete per deletionPolicy (Retain keeps everything)")
    refresh = command("refresh", "refresh now and print what happened (mode, duration, rows)")
    arguments.add_refresh_arguments(refresh, modes=[m.value for m in RefreshMode])
    command(
        "verify",
        "compare an incremental view's stored rows with a full recompute of its query (exit 1 on a mismatch)",
    )
    pager = command("page", "print one keyset page of a view, as matview.client.page reads it")
    pager.add_argument("--order", required=True, help="comma-separated columns (a unique index must cover them)")
    pager.add_argument("--limit", type=int, default=100, help="rows per page")
    where = pager.add_mutually_exclusive_group()
    where.add_argument("--after", help="the next cursor a previous page printed")
    where.add_argument("--before", help="the previous cursor a page printed")
    pager.add_argument("--equal", action="append", metavar="COLUMN=VALUE", help="only rows with this value")

    def scheduling_flags(parser: argparse.ArgumentParser) -> None:
        """The flags the two long-running verbs share: one scheduling core, one set of defaults."""
        parser.add_argument("--metrics-port", type=int, default=DEFAULT_PORT, help="0 disables the metrics server")
        parser.add_argument(
            "--max-concurrent",
            type=int,
            default=RunnerSettings.max_concurrent_per_database,
            help="the most refreshes at once per database: its lane starts with "
            f"{RunnerSettings.base_concurrent_per_database} slots and grows to this while due refreshes wait",
        )
        parser.add_argument(
            "--drift-check-seconds",
            type=float,
            default=RunnerSettings.drift_check_seconds,
            help="how often each view is re-applied to repair hand-made changes (dropped triggers, indexes)",
        )
        parser.add_argument("--allow-superuser-run-as-role", action="store_true", help=allow_superuser)

    run = command("run", "apply, then keep views refreshed on schedule with /metrics", files=False)
    run.add_argument("paths", nargs="+", metavar="FILE|DIR", help="YAML files or directories of them")
    scheduling_flags(run)
    run.add_argument(
        "--metrics-address",
        default="127.0.0.1",
        help="address /metrics listens on (default: this machine only; 0.0.0.0 for a scraper elsewhere)",
    )
    arguments.add_control_socket_argument(
        run, "the Unix socket 'matview refresh' of these files is handed to (empty: none)"
    )
    run.add_argument(
        "--retry-seconds",
        type=float,
        default=RunnerSettings.retry_seconds,
        help="first wait after a failed apply or refresh; doubles per failure up to the view's period",
    )
    op = command("operator", "run the Kubernetes operator (wraps kopf)", files=False, database=False)
    scope = op.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", help="watch this namespace (repeatable)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    scheduling_flags(op)
    op.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="kopf liveness endpoint URL")
    op.add_argument("--peering", help="kopf peering name (needs kopf's peering CRD); default: standalone")
    op.add_argument(
        "--shard-count", type=int, default=1, help="replicas splitting the views by a hash of namespace/name"
    )
    op.add_argument("--shard-index", type=int, default=0, help="this replica's shard, from 0 to shard-count - 1")
    demo_parser = command(
        "demo",
        "build a slow 8-CTE reporting view, make it fast with a materialized view, and keep it fresh",
        files=False,
    )
    demo_parser.add_argument("--drivers", type=int, default=20000, help="scale of the generated workload")
    demo_parser.add_argument("--once", action="store_true", help="exit after the comparison")
    demo_parser.add_argument("--metrics-port", type=int, default=DEFAULT_PORT)
    cmp = command("compare", "EXPLAIN ANALYZE representative queries on the MV and its fallback")
    cmp.add_argument("--fallback", required=True, help="the plain view to compare with, as schema.view")
    cmp.add_argument("--repeats", type=int, default=3)
    command("embedded-stop", "stop the embedded PostgreSQL", files=False, database=False)
    command(
        "embedded-clean",
        "stop the embedded PostgreSQL and delete its data directory (.matview/pgdata)",
        files=False,
        database=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    handed = control.refresh_through_run(argv)
    if handed is not None:
        return handed
    parser = build_parser()
    args = parser.parse_args(argv)
    daemon = args.command in ("run", "operator")  # long-running: every refresh is logged
    logging.basicConfig(
        level=logging.INFO if args.verbose or daemon else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler = handler_of(args.command)
    as_json = bool(getattr(args, "json", False))
    try:
        return handler(args)
    except SpecError as exc:
        problems = [{"field": e.path, "message": e.message} for e in exc.errors]
        if as_json:  # a pipeline reading stdout gets a JSON error document, not silence
            print(json.dumps([{"file": exc.source or None, "error": {"kind": "invalid", "problems": problems}}]))
        else:
            print(f"invalid: {exc.source + ': ' if exc.source else ''}", file=sys.stderr)
            for error in exc.errors:
                print(f"  {error}", file=sys.stderr)
        return EXIT_INVALID
    except Exception as exc:
        import psycopg

        if not isinstance(exc, MatviewError | psycopg.Error):
            raise
        message = f"database: {exc}" if isinstance(exc, psycopg.Error) else str(exc)
        if as_json:
            print(json.dumps([{"error": {"kind": "failed", "message": message.strip()}}]))
        else:
            print(f"error: {message}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
