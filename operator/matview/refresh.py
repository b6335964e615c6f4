"""Refresh a materialized view without blocking readers, safely, and say what happened.

Modes (``spec.refresh.mode``):

- Concurrent: ``REFRESH ... CONCURRENTLY`` (readers keep reading; needs a populated view
  and a unique index on plain columns without WHERE).
- Swap: build a fresh copy with its indexes beside the old one and swap names in
  one short transaction (readers wait only for the rename).
- Full: plain ``REFRESH`` (blocks readers for the whole rebuild).
- Auto: a non-blocking mode whenever one is possible, chosen from the durations
  measured on this view; plain only when neither is possible. The choice and its
  reason are part of the result.

Safety: one refresh per view at a time, across processes and replicas, by a
transaction-level advisory lock (works behind PgBouncer in transaction mode);
``statement_timeout`` and ``lock_timeout`` on every step, with retries for steps
that wait for ACCESS EXCLUSIVE. A failed or timed-out refresh leaves the old data
readable. The result (and the state persisted in the view's marker) records
the outcome.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import psycopg
from psycopg import sql

from matview.catalog import Connection, DependentView, read_dependents
from matview.engine import lock_key, settings_for
from matview.errors import DependentObjectsError, MatviewError
from matview.executor import (
    BusyStepError,
    ExecutionSettings,
    execute,
    pin_name_resolution,
    run_with_lock_retries,
    set_timeouts,
    try_transaction_lock,
)
from matview.marker import Marker
from matview.planner import Plan, comment_sql, relation_id, swap_steps
from matview.spec import MaterializedView

logger = logging.getLogger(__name__)

Mode = Literal["Concurrent", "Full", "Swap"]
Outcome = Literal["success", "failure", "skipped"]

#: Weight of the newest measurement in the per-mode duration average.
EVIDENCE_WEIGHT = 0.5
#: Every this many refreshes, Auto measures the other non-blocking mode again when the two are close.
EXPLORE_EVERY = 10
#: "Close": the slower mode is within this factor of the faster one.
EXPLORE_RATIO = 2.0
#: SQLSTATEs of CONCURRENTLY failures that a non-concurrent refresh fixes (not populated; no usable index).
CONCURRENT_FALLBACK_SQLSTATES = {"0A000", "55000"}


@dataclass(frozen=True)
class RefreshState:
    """What the engine remembers between refreshes; persisted in the view's marker."""

    last_success: dt.datetime | None = None
    durations: dict[str, float] = field(default_factory=dict)
    """Moving average of successful refresh durations per mode, in seconds."""
    source_version: str | None = None
    """Fingerprint of the base tables as seen by the last successful refresh (onlyIfChanged)."""
    runs: int = 0

    @classmethod
    def from_marker(cls, data: dict[str, Any]) -> RefreshState:
        last = data.get("lastSuccess")
        durations = data.get("durations")
        return cls(
            last_success=dt.datetime.fromisoformat(last) if isinstance(last, str) else None,
            durations={str(k): float(v) for k, v in durations.items()} if isinstance(durations, dict) else {},
            source_version=data.get("sourceVersion") if isinstance(data.get("sourceVersion"), str) else None,
            runs=int(data.get("runs", 0)) if isinstance(data.get("runs", 0), int) else 0,
        )

    def to_marker(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "durations": {k: round(v, 4) for k, v in sorted(self.durations.items())},
            "runs": self.runs,
        }
        if self.last_success is not None:
            data["lastSuccess"] = self.last_success.isoformat()
        if self.source_version is not None:
            data["sourceVersion"] = self.source_version
        return data

    def after_success(self, mode: str, seconds: float, when: dt.datetime, version: str | None) -> RefreshState:
        previous = self.durations.get(mode)
        average = seconds if previous is None else EVIDENCE_WEIGHT * seconds + (1 - EVIDENCE_WEIGHT) * previous
        return replace(
            self,
            last_success=when,
            durations={**self.durations, mode: average},
            source_version=version,
            runs=self.runs + 1,
        )


@dataclass(frozen=True)
class RefreshResult:
    """One refresh attempt: what ran, why, how long, and how it ended."""

    relation: str
    mode: str
    """The mode that ran (Concurrent, Full, Swap), or "none" when skipped."""
    result: Outcome
    reason: str
    """Why this mode was used, or why the refresh was skipped."""
    started_at: dt.datetime
    completed_at: dt.datetime
    duration_seconds: float
    message: str = ""
    failure_reason: str | None = None
    """timeout, lock_timeout, duplicate_rows, permission, connection or other."""
    fallback_from: str | None = None
    data_current: bool = False
    """True after a success, or a skip that verified no base table changed: the view is not stale."""
    populated: bool | None = None
    rows: int | None = None
    table_bytes: int | None = None
    index_bytes: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "relation": self.relation,
            "mode": self.mode,
            "result": self.result,
            "reason": self.reason,
            "message": self.message,
            "failureReason": self.failure_reason,
            "fallbackFrom": self.fallback_from,
            "startTime": _iso(self.started_at),
            "completionTime": _iso(self.completed_at),
            "durationSeconds": round(self.duration_seconds, 3),
            "rows": self.rows,
            "tableBytes": self.table_bytes,
            "indexBytes": self.index_bytes,
        }


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Inspection:
    """Catalog facts that decide how a view can be refreshed."""

    oid: int | None = None
    ours: bool = False
    populated: bool = False
    concurrent_possible: bool = False
    swap_possible: bool = False
    swap_blocker: str = ""
    dependents: tuple[DependentView, ...] = ()
    indexes: tuple[str, ...] = ()
    marker: Marker | None = None

    @property
    def state(self) -> RefreshState:
        return RefreshState.from_marker(self.marker.state if self.marker else {})


_VIEW = sql.SQL("""
SELECT c.oid, c.relispopulated, obj_description(c.oid, 'pg_class'),
       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisunique AND i.indisvalid
                                        AND i.indpred IS NULL AND i.indexprs IS NULL)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s AND c.relkind = 'm'
""")

_SOURCES = sql.SQL("""
WITH RECURSIVE deps(oid) AS (
    SELECT d.refobjid FROM pg_rewrite r
    JOIN pg_depend d ON d.objid = r.oid AND d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
    WHERE r.ev_class = %(oid)s AND d.refobjid <> %(oid)s
    UNION
    SELECT d.refobjid FROM deps
    JOIN pg_class c ON c.oid = deps.oid AND c.relkind = 'v'
    JOIN pg_rewrite r ON r.ev_class = c.oid
    JOIN pg_depend d ON d.objid = r.oid AND d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
    WHERE d.refobjid <> c.oid
), relations AS (
    SELECT deps.oid FROM deps
    UNION
    SELECT t.relid FROM deps JOIN pg_class c ON c.oid = deps.oid AND c.relkind = 'p',
                         LATERAL pg_partition_tree(c.oid) t
)
SELECT c.oid, c.relkind, c.relfilenode, coalesce(s.n_tup_ins, 0), coalesce(s.n_tup_upd, 0),
       coalesce(s.n_tup_del, 0), CASE WHEN c.relkind = 'm' THEN obj_description(c.oid, 'pg_class') END
FROM relations JOIN pg_class c ON c.oid = relations.oid
LEFT JOIN pg_stat_all_tables s ON s.relid = c.oid
WHERE c.relkind IN ('r', 'm', 'p', 'f')
ORDER BY c.oid
""")

_SIZES = sql.SQL(
    "SELECT c.relispopulated, c.reltuples::bigint, pg_table_size(c.oid), pg_indexes_size(c.oid) "
    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s"
)

_MARKER = sql.SQL(
    "SELECT c.oid, obj_description(c.oid, 'pg_class') FROM pg_class c "
    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s"
)


def inspect(conn: Connection, view: MaterializedView) -> Inspection:
    """Read what decides the refresh mode: ownership, populated, a usable unique index, dependents."""
    row = conn.execute(_VIEW, (view.schema, view.name)).fetchone()
    if row is None:
        return Inspection()
    oid, populated, comment, unique = row
    marker = Marker.parse(comment)
    dependents = tuple(read_dependents(conn, int(oid)))
    indexes = tuple(
        str(r[0])
        for r in conn.execute(
            sql.SQL("SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = %s"),
            (oid,),
        ).fetchall()
    )
    blocker = ""
    try:
        swap_steps(view, list(dependents))
    except DependentObjectsError as exc:
        blocker = str(exc)
    return Inspection(
        oid=int(oid),
        ours=marker is not None and marker.owner == view.owner and marker.kind == "view",
        populated=bool(populated),
        concurrent_possible=bool(populated) and bool(unique),
        swap_possible=not blocker,
        swap_blocker=blocker,
        dependents=dependents,
        indexes=indexes,
        marker=marker,
    )


def source_version(conn: Connection, oid: int) -> str | None:
    """A fingerprint of every table the view reads (through views): write counters and relfilenode.

    None when the query reads a foreign table, whose changes cannot be seen.
    Counters come from the statistics system, which a writing session reports
    within about a second of committing.
    """
    rows = conn.execute(_SOURCES, {"oid": oid}).fetchall()
    if any(r[1] == "f" for r in rows):
        return None
    return hashlib.sha256(repr(rows).encode()).hexdigest()[:24]


def choose_mode(view: MaterializedView, inspection: Inspection, requested: str | None = None) -> tuple[Mode, str]:
    """Pure: which mode to run and why."""
    wanted = requested or view.refresh.mode
    if wanted in ("Concurrent", "Full", "Swap"):
        return wanted, f"mode {wanted} requested"  # type: ignore[return-value]
    if not inspection.populated:
        return "Full", "the view is not populated: CONCURRENTLY is impossible and nobody can read it yet"
    if inspection.concurrent_possible and inspection.swap_possible:
        state = inspection.state
        concurrent, swap = state.durations.get("Concurrent"), state.durations.get("Swap")
        if concurrent is None:
            return "Concurrent", "Auto: no measurements yet, starting with Concurrent"
        if swap is None:
            return "Swap", f"Auto: measuring Swap once to compare with Concurrent ({concurrent:.2f}s)"
        best, other = ("Concurrent", "Swap") if concurrent <= swap else ("Swap", "Concurrent")
        fast, slow = min(concurrent, swap), max(concurrent, swap)
        if state.runs % EXPLORE_EVERY == EXPLORE_EVERY - 1 and slow <= fast * EXPLORE_RATIO:
            return other, f"Auto: re-measuring {other} ({slow:.2f}s) against {best} ({fast:.2f}s)"  # type: ignore[return-value]
        return best, f"Auto: {best} is cheaper on this view ({fast:.2f}s vs {slow:.2f}s)"  # type: ignore[return-value]
    if inspection.concurrent_possible:
        return "Concurrent", f"Auto: Swap is not possible ({inspection.swap_blocker})"
    if inspection.swap_possible:
        return "Swap", "Auto: no unique index without WHERE on plain columns, so CONCURRENTLY is impossible"
    return "Full", (
        "Auto: neither non-blocking mode is possible (no usable unique index; "
        f"{inspection.swap_blocker}); plain refresh blocks readers"
    )


def classify(exc: BaseException) -> str:
    """Map an error to the bounded set of failure reasons used in metrics."""
    if isinstance(exc, psycopg.errors.QueryCanceled):
        # statement_timeout; a cancel on shutdown says "due to user request" and is not a timeout.
        return "timeout" if "timeout" in str(exc) else "other"
    if isinstance(exc, psycopg.errors.LockNotAvailable):
        return "lock_timeout"
    if isinstance(exc, psycopg.errors.UniqueViolation | psycopg.errors.CardinalityViolation):
        return "duplicate_rows"
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return "permission"
    if isinstance(exc, psycopg.OperationalError) or (getattr(exc, "sqlstate", None) or "").startswith("08"):
        return "connection"
    cause = exc.__cause__
    if isinstance(exc, MatviewError) and isinstance(cause, psycopg.Error):
        return classify(cause)
    return "other"


class Busy(MatviewError):
    """Another session holds the view's refresh lock."""


def _lock(conn: Connection, view: MaterializedView) -> None:
    if not try_transaction_lock(conn, lock_key(view)):
        raise Busy(f"{view.relation}: another refresh of this view is running")


def _refresh_in_place(
    conn: Connection,
    view: MaterializedView,
    mode: Mode,
    marker_for: Callable[[float], Marker],
    settings: ExecutionSettings,
) -> None:
    statement = sql.SQL("REFRESH MATERIALIZED VIEW {}{}").format(
        sql.SQL("CONCURRENTLY ") if mode == "Concurrent" else sql.SQL(""), relation_id(view.schema, view.name)
    )

    def attempt() -> None:
        with conn.transaction():
            _lock(conn, view)
            set_timeouts(conn, settings.statement_timeout_seconds, settings.lock_timeout_seconds, local=True)
            pin_name_resolution(conn, view, local=True)  # REFRESH runs the stored query as the view's owner
            clock = time.monotonic()
            conn.execute(statement)
            # The new state commits with the data it describes: no window where one exists without the other.
            conn.execute(comment_sql("view", relation_id(view.schema, view.name), marker_for(time.monotonic() - clock)))

    run_with_lock_retries(attempt, settings, f"refresh {view.relation}")


def _refresh_by_swap(
    conn: Connection, view: MaterializedView, inspection: Inspection, marker_after: Marker, settings: ExecutionSettings
) -> None:
    steps = swap_steps(view, list(inspection.dependents), state=marker_after.state, old_indexes=inspection.indexes)
    guarded = replace(settings, advisory_lock=lock_key(view))
    try:
        execute(conn, Plan(view, tuple(steps), ("refresh by swap",)), guarded)
    except BusyStepError as exc:
        raise Busy(str(exc)) from exc


def refresh(
    conn: Connection,
    view: MaterializedView,
    mode: str | None = None,
    settings: ExecutionSettings | None = None,
    force: bool = False,
) -> RefreshResult:
    """Refresh view once. Never raises for a refresh that failed: the result says how and why."""
    settings = settings or settings_for(view)
    started = dt.datetime.now(dt.UTC)
    clock = time.monotonic()

    def finish(outcome: Outcome, used: str, reason: str, **extra: Any) -> RefreshResult:
        completed = dt.datetime.now(dt.UTC)
        result = RefreshResult(
            view.relation, used, outcome, reason, started, completed, time.monotonic() - clock, **extra
        )
        level = logging.WARNING if outcome == "failure" else logging.INFO
        logger.log(
            level,
            "refresh end: relation=%s mode=%s result=%s duration=%.3fs rows=%s reason=%s%s",
            view.relation,
            used,
            outcome,
            result.duration_seconds,
            result.rows,
            reason,
            f" message={result.message}" if result.message else "",
        )
        return result

    try:
        inspection = inspect(conn, view)
    except psycopg.Error as exc:
        return finish(
            "failure", "none", "could not inspect the view", message=str(exc).strip(), failure_reason=classify(exc)
        )
    if inspection.oid is None or not inspection.ours:
        what = "does not exist (apply it first)" if inspection.oid is None else "is not managed by this resource"
        return finish(
            "failure", "none", f"{view.relation} {what}", message=f"{view.relation} {what}", failure_reason="other"
        )

    version = None
    try:
        version = source_version(conn, inspection.oid)
    except psycopg.Error as exc:
        logger.warning("%s: could not read source statistics: %s", view.relation, exc)
    if (
        view.refresh.only_if_changed
        and not force
        and inspection.populated
        and version is not None
        and version == inspection.state.source_version
    ):
        return finish(
            "skipped", "none", "onlyIfChanged: no base table was written since the last refresh", data_current=True
        )

    chosen, reason = choose_mode(view, inspection, mode)
    if chosen == "Concurrent" and not inspection.concurrent_possible and (mode or view.refresh.mode) == "Concurrent":
        why = "it is not populated" if not inspection.populated else "it has no unique index without WHERE"
        return finish(
            "failure", "Concurrent", reason, message=f"CONCURRENTLY is impossible: {why}", failure_reason="other"
        )
    logger.info("refresh start: relation=%s mode=%s reason=%s", view.relation, chosen, reason)

    fallback_from = None
    state = inspection.state
    digest = inspection.marker.digest if inspection.marker else ""

    def marker_for(seconds: float) -> Marker:
        return Marker(
            view.owner,
            "view",
            digest,
            state.after_success(chosen, seconds, dt.datetime.now(dt.UTC), version).to_marker(),
        )

    while True:
        attempt_clock = time.monotonic()
        try:
            if chosen == "Swap":
                _refresh_by_swap(conn, view, inspection, marker_for(state.durations.get("Swap", 0.0)), settings)
                # The swap's build time is only known now; record it (the data and last success are already in).
                _record(conn, view, marker_for(time.monotonic() - attempt_clock))
            else:
                _refresh_in_place(conn, view, chosen, marker_for, settings)
        except Busy as exc:
            return finish("skipped", "none", "another refresh of this view is running", message=str(exc))
        except (psycopg.Error, MatviewError) as exc:
            sqlstate = getattr(exc, "sqlstate", None) or getattr(exc.__cause__, "sqlstate", None)
            automatic = (mode or view.refresh.mode) == "Auto"
            if chosen == "Concurrent" and automatic and sqlstate in CONCURRENT_FALLBACK_SQLSTATES:
                fallback_from = "Concurrent"
                chosen = "Swap" if inspection.populated and inspection.swap_possible else "Full"
                reason = f"Concurrent failed ({_message(exc)}); fell back to {chosen}"
                logger.warning("%s: %s", view.relation, reason)
                continue
            return finish(
                "failure",
                chosen,
                reason,
                message=_message(exc),
                failure_reason=classify(exc),
                fallback_from=fallback_from,
            )
        break

    size = view_size(conn, view)
    return finish(
        "success",
        chosen,
        reason,
        fallback_from=fallback_from,
        populated=size.populated,
        rows=size.rows,
        table_bytes=size.table_bytes,
        index_bytes=size.index_bytes,
    )


def _message(exc: BaseException) -> str:
    if isinstance(exc, psycopg.Error) and exc.diag.message_primary:
        return exc.diag.message_primary
    return str(exc).strip()


def _record(conn: Connection, view: MaterializedView, marker: Marker) -> None:
    try:
        with conn.transaction():
            set_timeouts(conn, 5, 1, local=True)
            conn.execute(comment_sql("view", relation_id(view.schema, view.name), marker))
    except psycopg.Error as exc:  # the refresh itself succeeded; only the evidence is late
        logger.warning("%s: could not record the refresh state: %s", view.relation, exc)


@dataclass(frozen=True)
class ViewSize:
    populated: bool | None = None
    rows: int | None = None
    """pg_class.reltuples; None until the view was first analyzed."""
    table_bytes: int | None = None
    index_bytes: int | None = None

    @property
    def total_bytes(self) -> int | None:
        if self.table_bytes is None or self.index_bytes is None:
            return None
        return self.table_bytes + self.index_bytes


def view_size(conn: Connection, view: MaterializedView) -> ViewSize:
    """Populated, estimated rows and sizes of the view (empty when it cannot be read)."""
    try:
        row = conn.execute(_SIZES, (view.schema, view.name)).fetchone()
    except psycopg.Error:
        return ViewSize()
    if row is None:
        return ViewSize()
    populated, rows, table_bytes, index_bytes = row
    return ViewSize(
        bool(populated), int(rows) if rows is not None and rows >= 0 else None, int(table_bytes), int(index_bytes)
    )


def _marker(conn: Connection, view: MaterializedView) -> tuple[int | None, Marker | None]:
    row = conn.execute(_MARKER, (view.schema, view.name)).fetchone()
    return (int(row[0]), Marker.parse(row[1])) if row else (None, None)


def read_state(conn: Connection, view: MaterializedView) -> RefreshState:
    """The persisted refresh state of view (empty when it has none)."""
    _, marker = _marker(conn, view)
    return RefreshState.from_marker(marker.state if marker else {})


def record_build(conn: Connection, view: MaterializedView, when: dt.datetime | None = None) -> None:
    """After apply built the view's data (create or swap), count it as a successful refresh."""
    oid, marker = _marker(conn, view)
    if oid is None or marker is None or marker.owner != view.owner:
        return
    state = replace(
        RefreshState.from_marker(marker.state),
        last_success=when or dt.datetime.now(dt.UTC),
        source_version=source_version(conn, oid),
    )
    _record(conn, view, replace(marker, state=state.to_marker()))
