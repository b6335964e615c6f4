"""The reconcile engine's public entry points: plan, apply, delete.

Observe → plan (pure) → execute. The CLI, the operator and the demo all call
these functions; they hold no state between calls, so the database (with the
ownership markers) is the only record of what has been done.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from matview.errors import MatviewError
from matview.plan import session
from matview.plan.catalog import observe
from matview.plan.observed import Connection

__all__ = [
    "ApplyPolicy",
    "ApplyResult",
    "BusyError",
    "Connection",
    "MatviewError",
    "apply",
    "connect",
    "delete",
    "lock_key",
    "plan",
    "render",
    "view_lock",
]
from matview.api.spec import MaterializedView
from matview.plan.executor import BusyError, ExecutionSettings, execute, lock_key, view_lock
from matview.plan.planner import ApplyPolicy, build_delete_plan, build_plan
from matview.plan.statements import Plan, wanted_names


@dataclass
class ApplyResult:
    view: MaterializedView
    plan: Plan
    done: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.done)

    @property
    def built(self) -> bool:
        """The view's data was computed afresh (created or swapped), as a refresh would: not just re-indexed."""
        done = set(self.done)
        return any(step.makes_data_live and step.description in done for step in self.plan.steps)


def connect(dsn: str, connect_timeout: int = 10) -> Connection:
    """A connection in autocommit mode that says who it is in pg_stat_activity, its search_path pinned."""
    return session.connect(dsn, connect_timeout)


def settings_for(view: MaterializedView) -> ExecutionSettings:
    return ExecutionSettings(
        statement_timeout_seconds=view.refresh.timeout_seconds, lock_timeout_seconds=view.refresh.lock_timeout_seconds
    )


def plan(conn: Connection, view: MaterializedView, policy: ApplyPolicy | None = None) -> Plan:
    """What apply would do, without changing anything."""
    return build_plan(view, observe(conn, view, wanted_names(view)), policy)


def apply(
    conn: Connection,
    view: MaterializedView,
    settings: ExecutionSettings | None = None,
    policy: ApplyPolicy | None = None,
) -> ApplyResult:
    """Make the database match the spec; a second call right after does nothing."""
    with view_lock(conn, view):
        current = plan(conn, view, policy)
        done = execute(conn, current, settings or settings_for(view))
    return ApplyResult(view, current, done)


def delete(conn: Connection, view: MaterializedView, settings: ExecutionSettings | None = None) -> ApplyResult:
    """Honour deletionPolicy: Retain changes nothing, Delete drops what this resource created."""
    with view_lock(conn, view):
        current = build_delete_plan(view, observe(conn, view))
        done = execute(conn, current, settings or settings_for(view))
    return ApplyResult(view, current, done)


def render(plan: Plan, conn: Connection | None = None) -> list[str]:
    """The plan's SQL as text, one string per statement, for humans and --json."""
    lines = []
    for step in plan.steps:
        for statement in step.statements:
            lines.append(statement.as_string(conn))
    return lines
