"""The verbs on views: validate, plan, apply, delete, refresh, verify and page, each over the files named."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from matview.api.spec import MaterializedView
from matview.cli import report
from matview.cli.common import EXIT_FAILED, EXIT_INVALID, EXIT_OK, Batch, database_url, jsonable, policy
from matview.plan import engine


def cmd_validate(args: argparse.Namespace) -> int:
    batch = Batch(args.files)
    results = [{"resource": v.owner, "relation": v.relation, "file": f, "valid": True} for v, f in batch.views]
    return batch.finish(args, results, lambda r: f"{r['resource']}: valid ({r['relation']})")


def cmd_plan(args: argparse.Namespace) -> int:
    from matview.plan import planner

    batch = Batch(args.files)
    results = []
    with engine.connect(database_url(args)) as conn:
        for view, file in batch.views:

            def work(view: MaterializedView = view, file: str = file) -> dict[str, Any]:
                current = engine.plan(conn, view, policy(args))
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
    batch = Batch(args.files)
    results = []
    with engine.connect(database_url(args)) as conn:
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
    from matview.refresh import apply_and_record

    def apply(conn: Connection, view: MaterializedView) -> engine.ApplyResult:
        return apply_and_record(conn, view, policy(args))

    return _run_each(args, apply, "applied")


def cmd_delete(args: argparse.Namespace) -> int:
    return _run_each(args, engine.delete, "deleted")


def cmd_refresh(args: argparse.Namespace) -> int:
    from matview.refresh import refresh
    from matview.refresh.facts import dependency_order

    batch = Batch(args.files)
    files = {view.owner: file for view, file in batch.views}
    results = []
    with engine.connect(database_url(args)) as conn:
        # Upstream first, whatever order the files were given in.
        for view in dependency_order(conn, [view for view, _ in batch.views]):
            results.append({**refresh(conn, view, args.mode, force=True).as_dict(), "file": files[view.owner]})

    return report.refresh_exit(batch.finish(args, results, report.refresh_line), results)


def cmd_verify(args: argparse.Namespace) -> int:
    from matview.plan.engine import settings_for
    from matview.refresh import verify

    batch = Batch(args.files)
    results: list[dict[str, Any]] = []
    with engine.connect(database_url(args)) as conn:
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

    batch = Batch(args.files)
    equal = {}
    for item in args.equal or []:
        column, separator, value = item.partition("=")
        if not separator or not column:
            print(f"error: --equal {item!r}: write COLUMN=VALUE", file=sys.stderr)
            return EXIT_INVALID
        equal[column] = value
    order = [part for part in args.order.split(",") if part.strip()]
    results: list[dict[str, Any]] = []
    with engine.connect(database_url(args)) as conn:
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
                    "rows": [[jsonable(value) for value in row] for row in found.rows],
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
