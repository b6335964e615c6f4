"""One refresh attempt, from inspection to the recorded result (the engine behind ``matview.refresh``'s face):
under the view's lock, inspect, decide, run the chosen mode's steps, fall back once, record the state.
Also what counts a build as a refresh (``apply_and_record``, ``record_build``)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from matview import lru, timestamps
from matview.api import sqltext
from matview.api.spec import MaterializedView, RefreshMode
from matview.errors import MatviewError
from matview.outcomes import NO_MODE, FailureReason, Outcome
from matview.plan import capture, decoding, engine, partitions
from matview.plan.engine import settings_for
from matview.plan.executor import BusyError, Closing, ExecutionSettings, HeldLock, execute, view_lock
from matview.plan.marker import Marker
from matview.plan.observed import Connection
from matview.plan.planner import ApplyPolicy
from matview.plan.rebuild import (
    drop_leftover_step,
    incremental_step,
    record_state_statement,
    record_state_step,
    refresh_in_place_step,
    swap_steps,
)
from matview.plan.statements import Plan, Query, Step
from matview.plan.upstream import resolve_relations
from matview.refresh import drain, facts, policy, ranges, verify
from matview.refresh.facts import ViewSize, view_size
from matview.refresh.policy import Inspection, RefreshState

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefreshResult:
    """One refresh attempt: what ran, why, how long, and how it ended."""

    relation: str
    mode: str
    """The mode that ran (Concurrent, Full, Swap), or "none" when nothing ran."""
    result: Outcome
    reason: str
    """Why this mode was used, or why the refresh was skipped."""
    started_at: dt.datetime
    completed_at: dt.datetime
    duration_seconds: float
    message: str = ""
    failure_reason: FailureReason | None = None
    fallback_from: str | None = None
    data_current: bool = False
    """True after a success, or a skip that verified no base table changed: the view is not stale."""
    populated: bool | None = None
    rows: int | None = None
    table_bytes: int | None = None
    index_bytes: int | None = None
    data_version: int | None = None
    """The view's data version after this attempt (matview.client.version reads the same number)."""
    keys_applied: int | None = None
    """Incremental views: the changed keys this refresh applied (0 for a skip)."""
    change_ratio: float | None = None
    """Incremental views: pending keys as a share of the view's rows, when the decision was made."""
    staleness_seconds: float | None = None
    """Incremental views: age of the oldest unapplied change after this attempt (0 when none)."""
    busy: bool = False
    """Skipped because another process held the view's lock: nothing was decided, try again soon."""
    verification: verify.Verification | None = None
    """Incremental views: the periodic comparison with a full recompute, when this refresh made one."""
    slot_retained_wal_bytes: int | None = None
    """LogicalDecoding views: the WAL the view's replication slot keeps, after this attempt's drain."""
    partitions: partitions.PartitionWork | None = None
    """Partitioned views: the partitions this refresh rebuilt, made and retired (None for other views)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "relation": self.relation,
            "mode": self.mode,
            "result": self.result,
            "reason": self.reason,
            "message": self.message,
            "failureReason": self.failure_reason,
            "fallbackFrom": self.fallback_from,
            "startTime": timestamps.rfc3339(self.started_at),
            "completionTime": timestamps.rfc3339(self.completed_at),
            "durationSeconds": round(self.duration_seconds, 3),
            "rows": self.rows,
            "tableBytes": self.table_bytes,
            "indexBytes": self.index_bytes,
            **({"dataVersion": self.data_version} if self.data_version is not None else {}),
            **({"keysApplied": self.keys_applied} if self.keys_applied is not None else {}),
            **({"changeRatio": round(self.change_ratio, 6)} if self.change_ratio is not None else {}),
            **({"verification": self.verification.as_dict()} if self.verification is not None else {}),
            **({"partitions": self.partitions.as_dict()} if self.partitions is not None else {}),
        }


#: Lends a connection to the same database, configured like the refresh's, for the length of a with block.
#: Reading a replication slot empties the reading backend's catalog caches (PostgreSQL invalidates them after
#: logical decoding, for the peek and again for the advance): on the refresh's own connection, every statement
#: after the drain then read the catalog again, 4.5 ms more for a 22 ms incremental refresh of the driver matrix
#: (PostgreSQL 15), against 0.3 ms when the peek ran on another connection.
Aside = Callable[[], contextlib.AbstractContextManager[Connection]]


def _drain(
    conn: Connection,
    view: MaterializedView,
    settings: ExecutionSettings,
    aside: Aside | None,
    lent: contextlib.ExitStack,
    looked: tuple[Any, ...] | None,
) -> int | None:
    """The slot's changes into the log, read on a lent connection where there is one (the caller holds the view's
    lock on conn: the lock is a row, not the session, so another session of the operator may read the slot). The
    lent connection stays in ``lent`` with the slot's advance, which the server runs while the refresh does."""
    if aside is None:
        return drain.drain(conn, view, settings, looked=looked)
    other = lent.enter_context(aside())
    return drain.drain(conn, view, settings, reader=other, meanwhile=lent, looked=looked)


def refresh(
    conn: Connection,
    view: MaterializedView,
    mode: str | None = None,
    settings: ExecutionSettings | None = None,
    force: bool = False,
    progress: Callable[[partitions.RebuildProgress], None] | None = None,
    aside: Aside | None = None,
) -> RefreshResult:
    """Refresh view once. Never raises for a refresh that failed: the result says how and why. ``progress``
    is told, in this thread, each time a rebuild a partition at a time has swapped a partition in. ``aside``
    lends another connection to the same database for a LogicalDecoding view's drain (see ``Aside``)."""
    settings = settings or settings_for(view)
    started, clock = dt.datetime.now(dt.UTC), time.monotonic()
    attempt: policy.Run | None = None
    fallback_from: RefreshMode | None = None
    slot_bytes: dict[str, Any] = {}
    work = partitions.PartitionWork() if view.partitioning is not None else None
    # What the drain lent and left running (the slot's advance on the lent connection): ended before the result,
    # which counts its time, and before any return (see finish), so the lent connection goes back clean.
    lent = contextlib.ExitStack()

    def finish(outcome: Outcome, reason: str, **extra: Any) -> RefreshResult:
        lent.close()
        used = attempt.mode.value if attempt is not None else NO_MODE
        result = RefreshResult(
            view.relation,
            used,
            outcome,
            reason,
            started,
            dt.datetime.now(dt.UTC),
            time.monotonic() - clock,
            **slot_bytes,
            **extra,
        )
        _log(view, result)
        return result

    with lent:  # closed by finish before any return; here when a BaseException goes through
        try:
            look = drain.slot_query(view) if decoding.uses_decoding(view) else None
            with view_lock(conn, view, then=facts.inspection_query(view), also=look) as lock:
                if look is not None and lock.read_row is not None:
                    # The slot's changes into the log, then decide.
                    slot_bytes = {"slot_retained_wal_bytes": _drain(conn, view, settings, aside, lent, lock.also_row)}
                watermarks = None
                if ranges.append_only_sources(view) and lock.read_row is not None:
                    # The rows appended since the last refresh into the log, then decide.
                    recorded = facts.marked_state(view, lock.read_row)
                    if recorded is not None:
                        watermarks = ranges.drain(conn, view, settings, recorded.watermarks)
                inspection = facts.inspected(conn, view, lock.read_row)
                if watermarks is not None:
                    inspection = dataclasses.replace(inspection, watermarks=watermarks)
                decision = policy.decide(view, inspection, mode, force, started)
                incremental = _incremental_facts(view, inspection, started)
                if isinstance(decision, policy.Skip):
                    _maintain_when_skipped(conn, view, inspection, settings, work)
                    return finish(
                        Outcome.SKIPPED,
                        decision.reason,
                        data_current=decision.data_current,
                        message=work.summary if work is not None else "",
                        partitions=work,
                        **incremental,
                    )
                if isinstance(decision, policy.Refuse):
                    wanted = RefreshMode(mode or view.refresh.mode)
                    if wanted != RefreshMode.AUTO:
                        attempt = policy.Run(wanted, decision.reason)  # the failure is that mode's
                    return finish(
                        Outcome.FAILURE, decision.reason, message=decision.message, failure_reason=FailureReason.OTHER
                    )
                attempt = decision
                # At INFO a refresh is one line, its end: at a hundred refreshes a second each line costs throughput.
                logger.debug(
                    "refresh start: relation=%s mode=%s reason=%s", view.relation, attempt.mode, attempt.reason
                )
                # The state and the sizes are written and read in the refresh's own transaction, which also releases
                # the lock; except when a verification follows the refresh (it goes into the state, afterwards).
                verifying = attempt.mode == RefreshMode.INCREMENTAL and policy.verification_due(
                    view, inspection.state, started
                )
                closed = None if verifying else _Closed(view, inspection, lock)
                try:
                    seconds = _run(
                        conn, view, inspection, attempt.mode, settings, closed, work, attempt.touched_only, progress
                    )
                except MatviewError as error:
                    again = policy.fallback(view, inspection, mode, attempt.mode, error)
                    if again is None:
                        raise
                    logger.warning("%s: %s", view.relation, again.reason)
                    fallback_from, attempt = attempt.mode, again
                    seconds = _run(conn, view, inspection, attempt.mode, settings, closed, work, progress=progress)
                if closed is not None:
                    size = closed.size
                else:
                    verified_at = dt.datetime.now(dt.UTC)
                    incremental["verification"] = verify.safe_compare(conn, view, settings)
                    rebuild = policy.after_verification(view, incremental["verification"])
                    if rebuild is not None and inspection.swap_possible:
                        logger.warning("%s: %s", view.relation, rebuild.reason)
                        fallback_from, attempt = attempt.mode, rebuild
                        seconds = _run(conn, view, inspection, attempt.mode, settings, work=work, progress=progress)
                    _record(conn, view, inspection, attempt.mode, seconds, settings, verified_at)
                    size = view_size(conn, view)
                if incremental:
                    pending_after = facts.pending_changes(conn, view)
                    incremental["staleness_seconds"] = (
                        pending_after.staleness_seconds(dt.datetime.now(dt.UTC)) if pending_after else None
                    )
                    incremental["keys_applied"] = (
                        inspection.pending.keys if attempt.mode == RefreshMode.INCREMENTAL and inspection.pending else 0
                    )
        except BusyError as error:
            return finish(Outcome.SKIPPED, "another refresh of this view is running", message=str(error), busy=True)
        except Exception as error:
            if (
                not isinstance(error, psycopg.Error | MatviewError)
                and policy.classify(error) != FailureReason.CONNECTION
            ):
                logger.exception("%s: unexpected error during refresh", view.relation)
            return finish(
                Outcome.FAILURE,
                attempt.reason if attempt else "could not inspect the view",
                message=policy.message(error),
                failure_reason=policy.classify(error),
                fallback_from=fallback_from,
            )
        done_to_partitions = work.summary if work is not None else ""
        return finish(
            Outcome.SUCCESS,
            f"{attempt.reason}; {done_to_partitions}" if done_to_partitions else attempt.reason,
            partitions=work,
            fallback_from=fallback_from,
            data_current=True,
            populated=size.populated,
            rows=size.rows,
            table_bytes=size.table_bytes,
            index_bytes=size.index_bytes,
            data_version=size.data_version,
            **incremental,
        )


#: Per view (and database), what its last maintenance after a skipped refresh was due for
#: (partitions.maintenance_due): a target-lag view looks every few seconds, and reads its partitions again only
#: once a period has moved on (a refresh that runs maintains them anyway). Bounded: views come and go for as
#: long as the process lives.
_MAINTAINED: lru.Memo[tuple[object, ...], tuple[object, ...]] = lru.Memo(16384)


def _maintain_when_skipped(
    conn: Connection,
    view: MaterializedView,
    inspection: Inspection,
    settings: ExecutionSettings,
    work: partitions.PartitionWork | None,
) -> None:
    """A quiet view's periods move on too: when a refresh has nothing to do, the periods to come still get
    their partitions and those that left the retention window still go (one read when a period has moved on
    since the last time, none otherwise)."""
    now = dt.datetime.now(dt.UTC)
    due = partitions.maintenance_due(view, now)
    key = (conn.info.host, conn.info.port, conn.info.dbname, view.relation, view.owner)
    done = _MAINTAINED.get(key) == due
    if due is None or not inspection.ours or done:
        return
    step = partitions.maintenance_step(view, now, work)
    if step is None:
        return
    execute(conn, Plan(view, (step,), ("partition maintenance",), log_steps=False), settings)
    _MAINTAINED.put(key, due)


def _incremental_facts(view: MaterializedView, inspection: Inspection, now: dt.datetime) -> dict[str, Any]:
    """The incremental fields of a result, as the decision saw them (empty for other views)."""
    if view.incremental is None or inspection.pending is None:
        return {}
    pending = inspection.pending
    return {
        "keys_applied": 0,
        "change_ratio": policy.change_ratio(pending.keys, inspection.estimated_rows),
        "staleness_seconds": pending.staleness_seconds(now),
    }


def _steps(
    view: MaterializedView,
    inspection: Inspection,
    mode: RefreshMode,
    now: dt.datetime,
    by_partition: _ByPartition | None = None,
    work: partitions.PartitionWork | None = None,
    touched: tuple[list[dt.date], bool] | None = None,
) -> list[Step]:
    # Under the lock nobody else is building: a copy of ours still there was left by a crash; drop it first.
    cleanup = [drop_leftover_step(view.schema, name, relkind) for name, relkind in inspection.leftovers]
    cutoff = partitions.retention_cutoff(view, now)
    # After the refresh, in its last transaction's place: the periods to come get partitions, and those past
    # the retention window go.
    maintenance = partitions.maintenance_step(view, now, work)
    retire = [maintenance] if maintenance is not None else []
    if mode == RefreshMode.SWAP and by_partition is not None:
        found, leftovers, catalog = by_partition
        cleanup += [drop_leftover_step(view.schema, name, "r") for name in leftovers]
        if touched is not None:
            return cleanup + partitions.touched_rebuild_steps(view, found, touched, now, catalog, work) + retire
        rebuild = partitions.rebuild_steps(view, found, inspection.state.last_success, now, catalog, work)
        return cleanup + rebuild + retire
    if mode == RefreshMode.SWAP:
        state = inspection.marker.state if inspection.marker else {}
        swap = swap_steps(view, list(inspection.dependents), state=state, old_indexes=inspection.indexes)
        return cleanup + swap + retire
    if mode == RefreshMode.INCREMENTAL:
        assert inspection.key_catalog is not None and inspection.pending is not None
        filtered = capture.key_filtered_query(view, inspection.key_catalog).query
        keep = partitions.kept(view, cutoff, "q")
        return [*cleanup, incremental_step(view, filtered, inspection.pending.keys, keep), *retire]
    return [*cleanup, refresh_in_place_step(view, mode), *retire]


_ByPartition = tuple[list[partitions.PartitionFound], list[str], sqltext.KeyCatalog]
"""A per-partition rebuild's facts: the view's partitions, the leftovers to drop first, and what the query's
names resolve to (to filter the partition sources)."""


class _Closed:
    """How a refresh ends inside its own last transaction (executor.Closing): the new state into the marker,
    the lock released, the sizes and data version read; what the read returned, once committed."""

    def __init__(self, view: MaterializedView, inspection: Inspection, lock: HeldLock) -> None:
        self.view, self.inspection, self.lock = view, inspection, lock
        self.seconds: float | None = None
        self.size = ViewSize()
        self.measured = True
        """False for a refresh whose duration says nothing of its mode's (a rebuild of some partitions)."""

    def closing(self, mode: RefreshMode) -> Closing:
        def statements(seconds: float) -> list[Query]:
            self.seconds = seconds
            marker = _marker(self.view, self.inspection, mode, seconds, measured=self.measured)
            return [(record_state_statement(self.view, marker), None)]

        def committed(row: tuple[Any, ...] | None) -> None:
            self.lock.released = True
            self.size = facts.size_from_row(row)

        return Closing(statements, self.lock.releasing(facts.size_query(self.view)), committed)


def _run(
    conn: Connection,
    view: MaterializedView,
    inspection: Inspection,
    mode: RefreshMode,
    settings: ExecutionSettings,
    closed: _Closed | None = None,
    work: partitions.PartitionWork | None = None,
    touched_only: bool = False,
    progress: Callable[[partitions.RebuildProgress], None] | None = None,
) -> float:
    """Execute one mode's steps (ending with the closing, when given); return how long they took. What they
    do to a partitioned view's partitions goes into ``work``. ``touched_only``: see policy.Run."""
    clock = time.monotonic()
    now = dt.datetime.now(dt.UTC)
    by_partition = None
    if (
        mode == RefreshMode.SWAP
        and partitions.rebuilds_by_partition(view)
        and inspection.oid is not None
        and inspection.marker is not None
        and inspection.marker.digest == view.definition_digest  # else the whole view is rebuilt as declared now
    ):
        catalog = inspection.key_catalog or resolve_relations(conn, view)
        by_partition = (*facts.partitions_to_rebuild(conn, view, inspection.oid, now), catalog)
    if work is not None:  # a fallback plans again: only what the last plan did counts
        work.clear()
    touched = None
    if by_partition is not None and touched_only and view.incremental is not None:
        touched = _claim_touched(conn, view, by_partition[0], now, settings)
        if closed is not None:
            closed.measured = False  # some partitions are not what a full rebuild costs
    steps = tuple(_steps(view, inspection, mode, now, by_partition, work, touched))
    # A rebuild a partition at a time logs each step: its progress, and where an interrupted one stopped.
    plan = Plan(view, steps, (f"refresh ({mode})",), log_steps=by_partition is not None)
    execute(conn, plan, settings, closed.closing(mode) if closed is not None else None, _progress(work, progress))
    if closed is not None and closed.seconds is not None:
        return closed.seconds
    return time.monotonic() - clock


def _progress(
    work: partitions.PartitionWork | None, progress: Callable[[partitions.RebuildProgress], None] | None
) -> Callable[[str], None] | None:
    """What the executor tells as each rebuilt partition is swapped in, as progress against those planned."""
    if work is None or progress is None or not work.rebuilt:
        return None
    started, to_rebuild, swapped = dt.datetime.now(dt.UTC), len(work.rebuilt), []

    def completed(partition: str) -> None:
        swapped.append(partition)
        progress(partitions.RebuildProgress(started, len(swapped), to_rebuild, partition))

    return completed


def _claim_touched(
    conn: Connection,
    view: MaterializedView,
    found: list[partitions.PartitionFound],
    now: dt.datetime,
    settings: ExecutionSettings,
) -> tuple[list[dt.date], bool]:
    """Claim the changed keys of a partitioned incremental view and return the range partitions they touch,
    and whether they touch the DEFAULT partition too."""
    touched = partitions.TouchedPeriods()
    plan = Plan(
        view, (partitions.claim_touched_step(view, touched),), ("rebuild the touched partitions",), log_steps=False
    )
    execute(conn, plan, settings)
    assert touched.periods is not None
    return partitions.touched_ranges(view, found, touched.periods, now)


def _marker(
    view: MaterializedView,
    inspection: Inspection,
    mode: RefreshMode,
    seconds: float,
    verified_at: dt.datetime | None = None,
    measured: bool = True,
) -> Marker:
    """The view's marker after a success: the new state (measured duration unless not ``measured``, last
    success, sources seen)."""
    state = inspection.state.after_success(
        mode,
        seconds,
        dt.datetime.now(dt.UTC),
        inspection.source_version,
        inspection.untracked_version,
        keys=inspection.pending.keys if inspection.pending is not None else None,
        measured=measured,
    )
    if verified_at is not None:
        state = dataclasses.replace(state, last_verified=verified_at)
    if inspection.watermarks is not None:
        state = dataclasses.replace(state, watermarks=inspection.watermarks)
    digest = (
        view.definition_digest if mode == RefreshMode.SWAP else (inspection.marker.digest if inspection.marker else "")
    )
    return Marker(view.owner, "view", digest, state.to_marker())


def _record(
    conn: Connection,
    view: MaterializedView,
    inspection: Inspection,
    mode: RefreshMode,
    seconds: float,
    settings: ExecutionSettings,
    verified_at: dt.datetime | None = None,
) -> None:
    """The new state into the marker in a transaction of its own (after a verification)."""
    _write_marker(conn, view, _marker(view, inspection, mode, seconds, verified_at), settings, "the refresh state")


def apply_and_record(conn: Connection, view: MaterializedView, policy: ApplyPolicy | None = None) -> engine.ApplyResult:
    """Apply the view; when that built its data (a create, a swap), count the build as a refresh: its state
    and the sources it saw go into the marker. Every caller that applies goes through here."""
    clock = time.monotonic()
    result = engine.apply(conn, view, policy=policy)
    if result.built:
        # An incremental view's build is the full rebuild Auto weighs its keys against: its first measurement.
        seconds = time.monotonic() - clock if view.incremental is not None else None
        record_build(conn, view, build_seconds=seconds)
    return result


def record_build(
    conn: Connection, view: MaterializedView, when: dt.datetime | None = None, build_seconds: float | None = None
) -> None:
    """After apply built the view's data (create or swap), count it as a successful refresh (build_seconds,
    when given, as a measured full rebuild)."""
    oid, marker = facts.read_marker(conn, view.schema, view.name, view.run_as_role)
    if oid is None or marker is None or marker.owner != view.owner:
        return
    untracked = facts.untracked_version(conn, view) if view.incremental is not None else None
    state = RefreshState.from_marker(marker.state)
    if build_seconds is not None:
        state = state.measured(RefreshMode.SWAP, build_seconds)
    state = dataclasses.replace(
        state,
        last_success=when or dt.datetime.now(dt.UTC),
        source_version=facts.source_version(conn, view, oid),
        untracked_version=untracked,
    )
    settings = ExecutionSettings(statement_timeout_seconds=5, lock_timeout_seconds=1)
    _write_marker(conn, view, dataclasses.replace(marker, state=state.to_marker()), settings, "the build")


def _write_marker(
    conn: Connection, view: MaterializedView, marker: Marker, settings: ExecutionSettings, what: str
) -> None:
    """Write the view's marker with its refresh state, once: the data is already live, so a failure here
    only makes the evidence late and is logged, never raised."""
    try:
        execute(conn, Plan(view, (record_state_step(view, marker),)), dataclasses.replace(settings, lock_retries=1))
    except MatviewError as error:
        logger.warning("%s: could not record %s: %s", view.relation, what, error)


def _log(view: MaterializedView, result: RefreshResult) -> None:
    level = logging.WARNING if result.result == Outcome.FAILURE else logging.INFO
    logger.log(
        level,
        "refresh end: relation=%s mode=%s result=%s duration=%.3fs rows=%s reason=%s%s",
        view.relation,
        result.mode,
        result.result,
        result.duration_seconds,
        result.rows,
        result.reason,
        f" message={result.message}" if result.message else "",
    )
