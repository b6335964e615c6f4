"""The ``matview`` command: the same YAML as the operator, without Kubernetes.

Database: ``--dsn``, else ``DATABASE_URL``, else an embedded PostgreSQL in
``.matview/pgdata`` that is started on first use and keeps running, so a
newcomer needs no database at all. Exit codes: 0 success, 2 invalid spec or
usage, 1 anything the database refused (message on stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matview.api.spec import MaterializedView, RefreshMode
from matview.api.validation import load_file
from matview.errors import FieldError, MatviewError, SpecError
from matview.outcomes import Outcome
from matview.plan import engine

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
DEFAULT_EMBEDDED_DIR = Path(".matview/pgdata")


def _database_url(args: argparse.Namespace) -> str:
    if args.dsn:
        return str(args.dsn)
    if getattr(args, "dsn_file", None):
        return _read_dsn_file(Path(args.dsn_file))
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    from matview.embedded.localpg import ensure_embedded

    dsn = ensure_embedded(Path(args.embedded_dir))
    print(
        f"using the embedded PostgreSQL in {args.embedded_dir} ({dsn}); stop it with 'matview embedded-stop'",
        file=sys.stderr,
    )
    return dsn


def _policy(args: argparse.Namespace) -> engine.ApplyPolicy:
    return engine.ApplyPolicy(allow_superuser_run_as_role=bool(getattr(args, "allow_superuser_run_as_role", False)))


def _read_dsn_file(path: Path) -> str:
    """A DSN kept in a file (a mounted Secret, a 0600 file) so the password never shows in the process list."""
    try:
        status = path.stat()
        dsn = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([FieldError("--dsn-file", f"{path}: {getattr(exc, 'strerror', None) or exc}")]) from None
    # As libpq refuses a .pgpass others can read: group or other access, except group read of a root-owned
    # file (how some secret stores mount them).
    loose = status.st_mode & (0o037 if status.st_uid == 0 else 0o077)
    if loose:
        raise SpecError(
            [
                FieldError(
                    "--dsn-file",
                    f"{path} has group or other permissions ({stat.filemode(status.st_mode)}): it holds a password; "
                    f"chmod 600 {path} (a mounted Secret: defaultMode: 0400)",
                )
            ]
        )
    if not dsn:
        raise SpecError([FieldError("--dsn-file", f"{path} is empty")])
    return dsn


class _Batch:
    """The views of every file named, and the problems found so far; commands go on past a bad file or view."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.views: list[tuple[MaterializedView, str]] = []
        self.problems: list[dict[str, Any]] = []
        for path in paths:
            try:
                self.views += [(view, str(path)) for view in load_file(path)]
            except SpecError as exc:
                self.invalid(exc, str(path), None)

    def invalid(self, error: SpecError, file: str, view: MaterializedView | None) -> None:
        self.problems.append(
            {
                "file": file,
                "resource": view.owner if view else None,
                "error": {
                    "kind": "invalid",
                    "message": str(error),
                    "problems": [{"field": e.path, "message": e.message} for e in error.errors],
                },
            }
        )

    def failed(self, error: BaseException, file: str, view: MaterializedView) -> None:
        self.problems.append(
            {"file": file, "resource": view.owner, "error": {"kind": "failed", "message": str(error).strip()}}
        )

    def run(self, view: MaterializedView, file: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """work() for one view; a refusal or failure is recorded with its file and resource, not raised."""
        import psycopg

        try:
            return work()
        except SpecError as exc:
            self.invalid(exc, file, view)
        except (MatviewError, psycopg.Error) as exc:
            self.failed(exc, file, view)
        return None

    def finish(
        self, args: argparse.Namespace, results: list[dict[str, Any]], human: Callable[[dict[str, Any]], str]
    ) -> int:
        """Print results and problems; exit 2 when anything was invalid, 1 when anything failed."""
        if args.json:
            print(json.dumps([*results, *self.problems], indent=2))
        else:
            for result in results:
                print(human(result))
            for problem in self.problems:
                where = problem["file"] + (f" ({problem['resource']})" if problem["resource"] else "")
                error = problem["error"]
                if error["kind"] == "invalid":
                    print(f"invalid: {where}:", file=sys.stderr)
                    for item in error["problems"]:
                        print(f"  {item['field']}: {item['message']}", file=sys.stderr)
                else:
                    print(f"error: {where}: {error['message']}", file=sys.stderr)
        kinds = {problem["error"]["kind"] for problem in self.problems}
        return EXIT_INVALID if "invalid" in kinds else EXIT_FAILED if kinds else EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    batch = _Batch(args.files)
    results = [{"resource": v.owner, "relation": v.relation, "file": f, "valid": True} for v, f in batch.views]
    return batch.finish(args, results, lambda r: f"{r['resource']}: valid ({r['relation']})")


def cmd_plan(args: argparse.Namespace) -> int:
    from matview.plan import planner

    batch = _Batch(args.files)
    results = []
    with engine.connect(_database_url(args)) as conn:
        for view, file in batch.views:

            def work(view: MaterializedView = view, file: str = file) -> dict[str, Any]:
                current = engine.plan(conn, view, _policy(args))
                return {
                    "resource": view.owner,
                    "relation": view.relation,
                    "file": file,
                    "reasons": list(current.reasons),
                    "warnings": [*current.warnings, *planner.reading_warnings(view)],
                    "steps": [
                        {
                            "description": s.description,
                            "transactional": s.transactional,
                            "sql": [st.as_string(conn) for st in s.statements],
                        }
                        for s in current.steps
                    ],
                    "incrementalQuery": current.incremental_query.text if current.incremental_query else None,
                }

            if (result := batch.run(view, file, work)) is not None:
                results.append(result)

    def human(r: dict[str, Any]) -> str:
        incremental = (
            f"\n  -- an incremental refresh recomputes the changed keys with:\n  {r['incrementalQuery']};"
            if r["incrementalQuery"]
            else ""
        )
        if not r["steps"]:
            return f"{r['relation']}: up to date, nothing to do{incremental}"
        lines = [f"{r['relation']}: {len(r['steps'])} step(s) ({'; '.join(r['reasons'])})"]
        lines += [f"  warning: {w}" for w in r["warnings"]]
        for step in r["steps"]:
            lines.append(f"  -- {step['description']}")
            lines += [f"  {statement};" for statement in step["sql"]]
        return "\n".join(lines) + incremental

    return batch.finish(args, results, human)


def _run_each(args: argparse.Namespace, operation: Callable[..., engine.ApplyResult], verb: str) -> int:
    batch = _Batch(args.files)
    results = []
    with engine.connect(_database_url(args)) as conn:
        for view, file in batch.views:

            def work(view: MaterializedView = view, file: str = file) -> dict[str, Any]:
                result = operation(conn, view)
                return {
                    "resource": view.owner,
                    "relation": view.relation,
                    "file": file,
                    "changed": result.changed,
                    "steps": result.done,
                    "reasons": list(result.plan.reasons),
                    "warnings": list(result.plan.warnings),
                }

            if (outcome := batch.run(view, file, work)) is not None:
                results.append(outcome)

    def human(r: dict[str, Any]) -> str:
        if not r["changed"]:
            return f"{r['relation']}: {'; '.join(r['reasons']) or 'up to date'}"
        return "\n".join(
            [f"{r['relation']}: {verb}", *(f"  - {s}" for s in r["steps"]), *(f"  warning: {w}" for w in r["warnings"])]
        )

    return batch.finish(args, results, human)


def cmd_apply(args: argparse.Namespace) -> int:
    from matview.plan.observed import Connection
    from matview.refresh import record_build

    def apply_and_record(conn: Connection, view: MaterializedView) -> engine.ApplyResult:
        result = engine.apply(conn, view, policy=_policy(args))
        if result.built:  # a build is a refresh: its state (and the sources it saw) go into the marker
            record_build(conn, view)
        return result

    return _run_each(args, apply_and_record, "applied")


def cmd_delete(args: argparse.Namespace) -> int:
    return _run_each(args, engine.delete, "deleted")


def cmd_refresh(args: argparse.Namespace) -> int:
    from matview.refresh import refresh
    from matview.refresh.facts import dependency_order

    batch = _Batch(args.files)
    files = {view.owner: file for view, file in batch.views}
    results = []
    with engine.connect(_database_url(args)) as conn:
        # Upstream first, whatever order the files were given in.
        for view in dependency_order(conn, [view for view, _ in batch.views]):
            results.append({**refresh(conn, view, args.mode, force=True).as_dict(), "file": files[view.owner]})

    def human(r: dict[str, Any]) -> str:
        line = f"{r['relation']}: {r['result']} ({r['mode']}, {r['durationSeconds']:.3f}s"
        line += f", {r['rows']} rows)" if r["rows"] is not None else ")"
        line += f"\n  why: {r['reason']}"
        if r["message"]:
            line += f"\n  {r['failureReason'] or 'note'}: {r['message']}"
        return line

    code = batch.finish(args, results, human)
    return code or (EXIT_FAILED if any(r["result"] == Outcome.FAILURE for r in results) else EXIT_OK)


def cmd_verify(args: argparse.Namespace) -> int:
    from matview.plan.engine import settings_for
    from matview.refresh import verify

    batch = _Batch(args.files)
    results: list[dict[str, Any]] = []
    with engine.connect(_database_url(args)) as conn:
        for view, file in batch.views:
            if view.incremental is None:
                results.append(
                    {"relation": view.relation, "file": file, "matches": None, "inconclusive": "not incremental"}
                )
                continue
            results.append({**verify.safe_compare(conn, view, settings_for(view)).as_dict(), "file": file})

    def human(r: dict[str, Any]) -> str:
        if r["inconclusive"]:
            return f"{r['relation']}: not verified: {r['inconclusive']}"
        if r["matches"]:
            return f"{r['relation']}: matches a full recompute ({r['pendingKeys']} pending key(s) left out)"
        return (
            f"{r['relation']}: MISMATCH: {r['extraRows']} row(s) stored that the query does not produce, "
            f"{r['missingRows']} row(s) the query produces that are not stored; check spec.incremental"
        )

    code = batch.finish(args, results, human)
    return code or (EXIT_FAILED if any(r["matches"] is False for r in results) else EXIT_OK)


def cmd_page(args: argparse.Namespace) -> int:
    """One keyset page of each view named, as an application reads it with matview.client.page."""
    from matview import client

    batch = _Batch(args.files)
    equal = {}
    for item in args.equal or []:
        column, separator, value = item.partition("=")
        if not separator or not column:
            print(f"error: --equal {item!r}: write COLUMN=VALUE", file=sys.stderr)
            return EXIT_INVALID
        equal[column] = value
    order = [part for part in args.order.split(",") if part.strip()]
    results: list[dict[str, Any]] = []
    with engine.connect(_database_url(args)) as conn:
        for view, file in batch.views:
            try:
                found = client.page(
                    conn,
                    (view.schema, view.name),
                    order,
                    limit=args.limit,
                    after=args.after,
                    before=args.before,
                    equal=equal,
                )
            except (client.OrderError, client.CursorError) as exc:
                batch.problems.append(
                    {
                        "file": file,
                        "resource": view.owner,
                        "error": {
                            "kind": "invalid",
                            "problems": [
                                {
                                    "field": "--after/--before" if isinstance(exc, client.CursorError) else "--order",
                                    "message": str(exc),
                                }
                            ],
                        },
                    }
                )
                continue
            results.append(
                {
                    "relation": view.relation,
                    "file": file,
                    "columns": list(found.columns),
                    "rows": [[_jsonable(value) for value in row] for row in found.rows],
                    "next": found.next,
                    "previous": found.previous,
                }
            )

    def human(r: dict[str, Any]) -> str:
        lines = ["\t".join(r["columns"])] + ["\t".join("" if v is None else str(v) for v in row) for row in r["rows"]]
        lines.append(
            f"-- {len(r['rows'])} row(s); next: {r['next'] or '(last page)'}; previous: "
            f"{r['previous'] or '(first page)'}"
        )
        return "\n".join(lines)

    return batch.finish(args, results, human)


def _jsonable(value: Any) -> Any:
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from matview.observe.metrics import RefreshMetrics
    from matview.refresh.runner import Refresher, RunnerSettings, Scheduler, yaml_files

    paths = [Path(p) for p in args.paths]
    for path in paths:
        if not path.exists():
            print(f"error: {path}: no such file or directory", file=sys.stderr)
            return EXIT_INVALID
    for file in yaml_files(paths):
        load_file(file)  # refuse to start on an invalid file; later edits are reloaded leniently
    dsn: str | Callable[[], str] = _database_url(args)
    if args.dsn_file:
        dsn_file = Path(args.dsn_file)
        dsn = lambda: _read_dsn_file(dsn_file)  # noqa: E731 - re-read every pass: a rotated password needs no restart
    metrics = RefreshMetrics()
    if args.metrics_port:
        metrics.serve(args.metrics_port, args.metrics_address)
        print(f"metrics on http://{args.metrics_address}:{args.metrics_port}/metrics", file=sys.stderr)
    refresher = Refresher(
        metrics,
        RunnerSettings(
            max_concurrent_per_database=args.max_concurrent,
            retry_seconds=args.retry_seconds,
            drift_check_seconds=args.drift_check_seconds,
            apply_policy=_policy(args),
        ),
    )

    async def main_loop() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await Scheduler(dsn, paths, refresher).run(stop)

    try:
        asyncio.run(main_loop())
    finally:
        refresher.close()
    return EXIT_OK


#: OperatorConfig fields → the flags of ``matview operator`` that set them (for error messages).
OPERATOR_FLAGS = {
    "metrics_port": "--metrics-port",
    "drift_check_seconds": "--drift-check-seconds",
    "max_concurrent_per_database": "--max-concurrent",
    "shard_index": "--shard-index",
    "shard_count": "--shard-count",
}


def cmd_operator(args: argparse.Namespace) -> int:
    import asyncio

    import kopf

    from matview.k8s import main as operator_main  # registers the handlers
    from matview.k8s.settings import SettingsError, checked, config_from_environment

    try:
        # The environment's MATVIEW_* settings the flags do not cover (retry delays, secret cache) still apply.
        config = checked(
            dataclasses.replace(
                config_from_environment(),
                metrics_port=args.metrics_port,
                drift_check_seconds=args.drift_check_seconds,
                max_concurrent_per_database=args.max_concurrent,
                peering=args.peering or None,
                shard_index=args.shard_index,
                shard_count=args.shard_count,
                allow_superuser_run_as_role=args.allow_superuser_run_as_role,
            ),
            OPERATOR_FLAGS,
        )
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    operator_main.use(config)

    namespaces = args.namespace or []
    if not namespaces and not args.all_namespaces:
        print("error: pass --all-namespaces or one or more --namespace NS", file=sys.stderr)
        return EXIT_INVALID
    asyncio.run(
        kopf.operator(
            clusterwide=args.all_namespaces,
            namespaces=namespaces,
            liveness_endpoint=args.liveness,
            standalone=not args.peering,
        )
    )
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    import asyncio
    import datetime as dt
    import signal
    import tempfile

    from matview import demo
    from matview.observe.metrics import RefreshMetrics
    from matview.refresh import schedule
    from matview.refresh.runner import Refresher, Scheduler

    if args.dsn or args.dsn_file or os.environ.get("DATABASE_URL"):
        dsn = _database_url(args)
    else:
        from matview.embedded.localpg import ensure_embedded

        print(f"-> starting an embedded PostgreSQL in {args.embedded_dir} (pgserver)", flush=True)
        dsn = ensure_embedded(Path(args.embedded_dir))
        print(f"   {dsn} (stop it with 'matview embedded-stop', remove it with 'matview embedded-clean')", flush=True)
    metrics = RefreshMetrics()

    def counted(view: MaterializedView, result: Any) -> None:
        metrics.track(view, schedule.expected_period_seconds(view, dt.datetime.now(dt.UTC)))
        metrics.record(view.namespace, view.resource_name, result)  # /metrics shows the demo's own refreshes

    with engine.connect(dsn) as conn:
        summary = demo.run_demo(conn, args.drivers, lambda line: print(line, flush=True), counted)
    if args.json:
        print(json.dumps(summary, default=str, indent=2))
    if args.once:
        return EXIT_OK
    metrics.serve(args.metrics_port, "127.0.0.1")
    workdir = tempfile.TemporaryDirectory(prefix="matview-demo-")  # removed when the demo ends
    spec_file = Path(workdir.name) / "driver-matrix.yaml"
    spec_file.write_text(demo.example_yaml())
    refresher = Refresher(metrics)
    logging.getLogger("matview").setLevel(logging.INFO)  # from here on, every refresh is worth a line

    async def loop() -> None:
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        # Announced only now: Ctrl-C is handled from this point on.
        print(
            f"\nkeeping {summary['relation']} fresh (hourly); metrics on "
            f"http://127.0.0.1:{args.metrics_port}/metrics — Ctrl-C to stop",
            flush=True,
        )
        await Scheduler(dsn, [spec_file], refresher).run(stop)

    try:
        asyncio.run(loop())
    except KeyboardInterrupt:
        pass  # Ctrl-C before the loop took over: stopping is what was asked for
    finally:
        refresher.close()
        workdir.cleanup()
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from psycopg import sql

    from matview import demo
    from matview.api import sqltext

    try:
        fallback = sqltext.parse_qualified_name(args.fallback)
    except ValueError as exc:
        raise SpecError([FieldError("--fallback", str(exc))]) from None
    batch = _Batch(args.files)
    if batch.problems:
        return batch.finish(args, [], str)
    with engine.connect(_database_url(args)) as conn:
        for view, _ in batch.views:
            fast = sql.Identifier(view.schema, view.name)
            slow = sql.Identifier(*fallback)
            shapes = [demo.Shape("first 25 rows", sql.SQL("SELECT * FROM {relation} LIMIT 25"))]
            for index in view.indexes:
                column = index.columns[0]
                value = conn.execute(
                    sql.SQL("SELECT {} FROM {} WHERE {} IS NOT NULL LIMIT 1").format(
                        sql.Identifier(column), fast, sql.Identifier(column)
                    )
                ).fetchone()
                if value is not None:
                    shapes.append(
                        demo.Shape(
                            f"{column} = ?",
                            sql.SQL("SELECT * FROM {relation} WHERE {column} = %s"),
                            (value[0],),
                            column=column,
                        )
                    )
            rows = demo.compare(conn, shapes, slow, fast, args.repeats, args.repeats * 5)
            print(f"{view.relation} vs {fallback[0]}.{fallback[1]} (EXPLAIN ANALYZE execution time, medians)")
            print(demo.table(rows, "fallback", "materialized"))
    return EXIT_OK


def cmd_embedded_stop(args: argparse.Namespace) -> int:
    from matview.embedded.localpg import stop_embedded

    stopped = stop_embedded(Path(args.embedded_dir))
    print(
        f"stopped {stopped}"
        if stopped
        else f"no embedded PostgreSQL was running in {Path(args.embedded_dir).resolve()}"
    )
    return EXIT_OK


def cmd_embedded_clean(args: argparse.Namespace) -> int:
    import shutil

    from matview.embedded.localpg import directory_bytes, stop_embedded

    data = Path(args.embedded_dir).resolve()
    stopped = stop_embedded(data)
    if stopped:
        print(f"stopped {stopped}")
    if not data.exists():
        print(f"nothing to remove: {data} does not exist")
        return EXIT_OK
    size = directory_bytes(data)
    shutil.rmtree(data)
    print(f"removed {data} ({size / 1024 / 1024:.0f} MB)")
    return EXIT_OK


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default only when it has a meaningful one (not None, not an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from matview.observe.metrics import DEFAULT_PORT
    from matview.refresh.runner import RunnerSettings

    parser = argparse.ArgumentParser(
        prog="matview",
        description="Declarative, safely refreshed PostgreSQL materialized views: the same YAML as the "
        "Kubernetes operator, without Kubernetes.",
        formatter_class=_HelpWithDefaults,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], text: str, files: bool = True, database: bool = True
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text, formatter_class=_HelpWithDefaults)
        p.set_defaults(handler=handler)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if files:
            p.add_argument("files", nargs="+", metavar="FILE", help="MaterializedView YAML file(s)")
        if database:
            source = p.add_mutually_exclusive_group()
            source.add_argument(
                "--dsn",
                help="libpq connection string or URI; it shows in the process list, so prefer --dsn-file or "
                "$DATABASE_URL for one with a password (default: $DATABASE_URL, else embedded)",
            )
            source.add_argument("--dsn-file", metavar="PATH", help="read the connection string from this file")
        p.add_argument("--embedded-dir", default=str(DEFAULT_EMBEDDED_DIR), help=argparse.SUPPRESS)
        return p

    command("validate", cmd_validate, "check files without touching any database", database=False)
    allow_superuser = "accept a spec.runAsRole that is a superuser (refused by default: its queries could do anything)"
    command("plan", cmd_plan, "print the SQL apply would run; changes nothing").add_argument(
        "--allow-superuser-run-as-role", action="store_true", help=allow_superuser
    )
    command("apply", cmd_apply, "make the database match the files").add_argument(
        "--allow-superuser-run-as-role", action="store_true", help=allow_superuser
    )
    command("delete", cmd_delete, "delete per deletionPolicy (Retain keeps everything)")
    refresh = command("refresh", cmd_refresh, "refresh now and print what happened (mode, duration, rows)")
    refresh.add_argument(
        "--mode", choices=[m.value for m in RefreshMode], help="override spec.refresh.mode (default: the spec's)"
    )
    command(
        "verify",
        cmd_verify,
        "compare an incremental view's stored rows with a full recompute of its query (exit 1 on a mismatch)",
    )
    pager = command("page", cmd_page, "print one keyset page of a view, as matview.client.page reads it")
    pager.add_argument("--order", required=True, help="comma-separated columns (a unique index must cover them)")
    pager.add_argument("--limit", type=int, default=100, help="rows per page")
    where = pager.add_mutually_exclusive_group()
    where.add_argument("--after", help="the next cursor a previous page printed")
    where.add_argument("--before", help="the previous cursor a page printed")
    pager.add_argument("--equal", action="append", metavar="COLUMN=VALUE", help="only rows with this value")
    run = command("run", cmd_run, "apply, then keep views refreshed on schedule with /metrics", files=False)
    run.add_argument("paths", nargs="+", metavar="FILE|DIR", help="YAML files or directories of them")
    run.add_argument("--metrics-port", type=int, default=DEFAULT_PORT, help="0 disables the metrics server")
    run.add_argument(
        "--metrics-address",
        default="127.0.0.1",
        help="address /metrics listens on (default: this machine only; 0.0.0.0 for a scraper elsewhere)",
    )
    run.add_argument(
        "--max-concurrent",
        type=int,
        default=RunnerSettings.max_concurrent_per_database,
        help="refreshes at once per database",
    )
    run.add_argument("--allow-superuser-run-as-role", action="store_true", help=allow_superuser)
    run.add_argument(
        "--retry-seconds",
        type=float,
        default=RunnerSettings.retry_seconds,
        help="first wait after a failed apply or refresh; doubles per failure up to the view's period",
    )
    run.add_argument(
        "--drift-check-seconds",
        type=float,
        default=RunnerSettings.drift_check_seconds,
        help="how often each view is re-applied to repair hand-made changes (dropped triggers, indexes)",
    )
    op = command("operator", cmd_operator, "run the Kubernetes operator (wraps kopf)", files=False, database=False)
    scope = op.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", help="watch this namespace (repeatable)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    op.add_argument("--metrics-port", type=int, default=DEFAULT_PORT, help="0 disables the metrics server")
    op.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="kopf liveness endpoint URL")
    op.add_argument(
        "--drift-check-seconds",
        type=float,
        default=RunnerSettings.drift_check_seconds,
        help="how often drift is repaired",
    )
    op.add_argument(
        "--max-concurrent",
        type=int,
        default=RunnerSettings.max_concurrent_per_database,
        help="refreshes at once per database",
    )
    op.add_argument("--allow-superuser-run-as-role", action="store_true", help=allow_superuser)
    op.add_argument("--peering", help="kopf peering name (needs kopf's peering CRD); default: standalone")
    op.add_argument(
        "--shard-count", type=int, default=1, help="replicas splitting the views by a hash of namespace/name"
    )
    op.add_argument("--shard-index", type=int, default=0, help="this replica's shard, from 0 to shard-count - 1")
    demo_parser = command(
        "demo",
        cmd_demo,
        "build a slow 8-CTE reporting view, make it fast with a materialized view, and keep it fresh",
        files=False,
    )
    demo_parser.add_argument("--drivers", type=int, default=20000, help="scale of the generated workload")
    demo_parser.add_argument("--once", action="store_true", help="exit after the comparison")
    demo_parser.add_argument("--metrics-port", type=int, default=DEFAULT_PORT)
    cmp = command("compare", cmd_compare, "EXPLAIN ANALYZE representative queries on the MV and its fallback")
    cmp.add_argument("--fallback", required=True, help="the plain view to compare with, as schema.view")
    cmp.add_argument("--repeats", type=int, default=3)
    command("embedded-stop", cmd_embedded_stop, "stop the embedded PostgreSQL", files=False, database=False)
    command(
        "embedded-clean",
        cmd_embedded_clean,
        "stop the embedded PostgreSQL and delete its data directory (.matview/pgdata)",
        files=False,
        database=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    daemon = args.command in ("run", "operator")  # long-running: every refresh is logged
    logging.basicConfig(
        level=logging.INFO if args.verbose or daemon else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler: Callable[[argparse.Namespace], int] = args.handler
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
