"""The one scheduler: when each view is applied, refreshed and checked for drift, in every process.

Two feeders tell it which views exist: the operator's watch (``k8s/watch.py``) and ``matview run``'s files
(``cli/files.py``), through ``put`` and ``forget``. One loop on due-queues (refreshes, one queue per database;
applies and drift checks) starts what is due, so a process holds a dict entry and at most two heap entries
per view, never a task or a timer each. A due refresh becomes a task only while its database has room for
it (``STARTED_PER_LANE_SLOT`` per slot of its lane's ceiling): when the lanes fall behind, the overdue
views wait as heap entries, not as thousands of parked tasks (10,000 views parked ~6,500 of them).

The rules are ``schedule``'s pure functions and are the same for both feeders:

- the next run counts from the last success, so a restarted process neither refreshes early nor skips;
- a failure backs off, doubling from ``retry_seconds`` up to the view's period; a round that failed
  before it could refresh (no credentials, an unexpected error) backs off the same way;
- a busy view (its lock held by another process) is looked at again after ``busy_retry_seconds``;
- each new manual request is acted on once;
- drift checks are spread evenly over their period by a stable per-view offset, a few at a time;
- one piece of work per view at a time: an edit is applied when the refresh in flight ends;
- a refresh waits for the refreshes in flight of the views it reads (upstream first).

Per-database lanes and caps are the refresher's. What a feeder does with a view (credentials, applying)
comes in through ``Work``; how it reports (status and Events, or logs) through ``Sink``. The core runs
no SQL and knows nothing of Kubernetes or files; its tests drive it with an injected clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from matview.api.spec import MaterializedView, SecretRef
from matview.outcomes import Outcome
from matview.refresh import schedule
from matview.refresh.feeding import Applied, Relation, Report, Sink, Work
from matview.refresh.queue import DueQueue
from matview.refresh.refresher import Refresher

logger = logging.getLogger(__name__)

#: The loop wakes at least this often even when nothing is due (a safety net; puts and ends wake it sooner).
MAX_SLEEP_SECONDS = 5.0

#: Refreshes started per slot of a database's lane ceiling: one runs in the slot while the next waits for it
#: (resolving its credentials, waiting for its upstream), so the lane never idles between two refreshes and
#: its growth still sees who waits; anything beyond stays in the due-queue, in due order, costing no task.
STARTED_PER_LANE_SLOT = 2

Database = tuple[str, SecretRef | None]
"""Views that share a Secret (in one namespace) share a database: the refresher's lanes are per connection
string, which only the feeder resolves; views of the CLI (no Secret) share one per namespace."""


def database_of(view: MaterializedView) -> Database:
    return (view.namespace, view.secret_ref)


@dataclasses.dataclass
class _Slot:
    view: MaterializedView | None
    """The spec as the feeder last gave it; None while it is invalid (the feeder reports why)."""
    ready: bool
    """The database matches this spec: refreshes may run."""
    track: schedule.Track
    request: str | None = None
    """The manual request the feeder last saw (acted on when it differs from track.handled_request)."""
    task: asyncio.Task[None] | None = None
    """The one piece of work in flight for this view (refresh, apply or drift check)."""
    waits_for: set[str] = dataclasses.field(default_factory=set)
    """The views whose work in flight this view's refresh waits for (upstream first)."""
    due_at: float | None = None
    """When the scheduled refresh is due (clock seconds), for lateness."""
    reads: frozenset[Relation] | None = None
    """What the view reads (None: not known yet)."""
    checked: bool = False
    """An apply or drift check has succeeded once: later checks keep their phase."""
    due_in: Database | None = None
    """The database whose refresh due-queue holds the view (None: not queued)."""


class Scheduler:
    """Every view of a process, on two due-queues served by one loop."""

    def __init__(self, refresher: Refresher, work: Work, sink: Sink, clock: Callable[[], float] = time.time) -> None:
        self.refresher = refresher
        self.settings = refresher.settings
        self.work = work
        self.sink = sink
        self.clock = clock
        self._slots: dict[str, _Slot] = {}
        self._stored_as: dict[Relation, set[str]] = {}
        self._refresh_due: dict[Database, DueQueue[str]] = {}
        self._check_due: DueQueue[str] = DueQueue()
        self._refreshes: set[asyncio.Task[None]] = set()
        self._refreshing: dict[Database, int] = {}
        """Refresh tasks started per database and not ended (running, or waiting for a lane slot)."""
        self._overdue_count, self._overdue_counted_at = 0, float("-inf")
        self._checks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._sleep_until = 0.0

    # --- what the feeders say ----------------------------------------------------------------------

    def put(
        self,
        key: str,
        view: MaterializedView | None,
        *,
        ready: bool | None = None,
        last_success: dt.datetime | None = None,
        request: str | None = None,
        handled_request: str | None = None,
    ) -> None:
        """A view as its feeder sees it now. ready: whether the database matches view (None: the scheduler
        knows, from its own applies; a changed spec is not applied). last_success: as recorded elsewhere
        (status); a newer one is adopted. handled_request: the last request acted on, for a view first seen."""
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot(
                view, False, schedule.Track(last_success=last_success, handled_request=handled_request)
            )
        elif slot.view != view:
            if view is not None and slot.view is not None:
                # A new spec: apply it now, not after the old spec's backoff; and learn again what it reads.
                slot.track = dataclasses.replace(slot.track, failures=0, hold_until=None, busy_until=None)
            slot.ready, slot.reads = False, None
        self._index(key, slot.view, view)
        slot.view = view
        if ready is not None:
            slot.ready = ready
        if last_success is not None and (slot.track.last_success is None or last_success > slot.track.last_success):
            slot.track = dataclasses.replace(slot.track, last_success=last_success)  # an apply rebuilt the data
        slot.request = request
        self._reschedule(key)

    def forget(self, key: str) -> None:
        """The view is gone (deleted, or in no file): stop; its work in flight is cancelled."""
        slot = self._slots.pop(key, None)
        self._check_due.discard(key)
        if slot is not None:
            self._unqueue_refresh(key, slot)
            self._index(key, slot.view, None)
            if slot.task is not None:
                slot.task.cancel()

    def _index(self, key: str, old: MaterializedView | None, new: MaterializedView | None) -> None:
        if old is not None and (new is None or old.relation != new.relation):
            keys = self._stored_as.get((old.schema, old.name), set())
            keys.discard(key)
            if not keys:
                self._stored_as.pop((old.schema, old.name), None)
        if new is not None:
            self._stored_as.setdefault((new.schema, new.name), set()).add(key)

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC)

    def _reschedule(self, key: str) -> None:
        """Queue the view's next refresh and check from what is known; nothing while its work is in flight
        (the work reschedules it when it ends)."""
        slot = self._slots.get(key)
        if slot is None or slot.task is not None:
            return
        view = slot.view
        if view is None:  # an invalid spec: the feeder reports it; a fix comes as a put
            self._unqueue_refresh(key, slot)
            self._check_due.discard(key)
            return
        now = self._now()
        last = slot.track.last_success
        self.refresher.metrics.track(
            view, schedule.expected_period_seconds(view, now), last.timestamp() if last else None
        )
        if not slot.ready:
            self._unqueue_refresh(key, slot)
            slot.due_at = None
            if self.work.applies:
                hold = schedule.held_until(slot.track)
                at = hold if hold is not None and hold > now else now
                self._set(self._check_due, key, at.timestamp())
            elif key not in self._check_due:
                self._set(self._check_due, key, self._first_check_at(key))
            return
        due = schedule.next_attempt(view, slot.track, now, slot.request)
        slot.due_at = due.timestamp() if due is not None else None
        self._queue_refresh(key, slot, view, slot.due_at)
        if key not in self._check_due:
            self._set(self._check_due, key, self._first_check_at(key))
        self.sink.scheduled(key, view, due, now)

    def _first_check_at(self, key: str) -> float:
        period = self.settings.drift_check_seconds
        return self.clock() + (schedule.spread_offset(key, period) or period)

    def _set(self, queue: DueQueue[str], key: str, due: float | None) -> None:
        queue.set(key, due)
        if due is not None and due < self._sleep_until:
            self._wake.set()

    def _queue_refresh(self, key: str, slot: _Slot, view: MaterializedView, due: float | None) -> None:
        database = database_of(view)
        if due is None or slot.due_in != database:  # nothing due, first queued, or its Secret changed
            self._unqueue_refresh(key, slot)
        if due is None:
            return
        queue = self._refresh_due.get(database)
        if queue is None:
            queue = self._refresh_due[database] = DueQueue()
        slot.due_in = database
        self._set(queue, key, due)

    def _unqueue_refresh(self, key: str, slot: _Slot) -> None:
        database, slot.due_in = slot.due_in, None
        queue = self._refresh_due.get(database) if database is not None else None
        if queue is not None:
            queue.discard(key)
            if not queue:
                del self._refresh_due[database]  # type: ignore[arg-type]

    def _refresh_room(self, database: Database) -> int:
        ceiling = self.settings.max_concurrent_per_database * STARTED_PER_LANE_SLOT
        return ceiling - self._refreshing.get(database, 0)

    def scheduled(self) -> int:
        """Views waiting in a due-queue for their next refresh (due or not)."""
        return sum(len(queue) for queue in self._refresh_due.values())

    def ready(self, key: str) -> bool:
        """The database matches the view's current spec: a refresh of it may run."""
        slot = self._slots.get(key)
        return slot is not None and slot.view is not None and slot.ready

    def upstream_first(self, keys: list[str]) -> list[str]:
        """keys, each after those among them that it reads (as far as known: what a view reads is learned
        before its first refresh); otherwise in the order given."""
        wanted, placed, order = set(keys), set(), []
        for first in keys:
            stack: list[tuple[str, bool]] = [(first, False)]
            entered: set[str] = set()
            while stack:
                key, upstream_done = stack.pop()
                if key in placed:
                    continue
                if upstream_done:
                    placed.add(key)
                    order.append(key)
                    continue
                if key in entered:  # a circle: break it here
                    continue
                entered.add(key)
                stack.append((key, True))
                slot = self._slots.get(key)
                for relation in sorted(slot.reads or ()) if slot is not None else ():
                    for other in sorted(self._stored_as.get(relation, ())):
                        if other in wanted and other not in placed and other != key:
                            stack.append((other, False))
        return order

    # --- the loop ----------------------------------------------------------------------------------

    def step(self) -> float:
        """Start everything due now; return when to look again (clock seconds)."""
        now = self.clock()
        refreshes_may_start: list[DueQueue[str]] = []
        for database, queue in list(self._refresh_due.items()):
            room = self._refresh_room(database)
            if room <= 0:
                continue
            for key in queue.pop_due(now, limit=room):
                slot = self._slots.get(key)
                if slot is not None:
                    slot.due_in = None
                if self._startable(key):
                    self._start_refresh(key, database)
            if not queue:
                del self._refresh_due[database]
            elif self._refresh_room(database) > 0:
                refreshes_may_start.append(queue)
        free = self.settings.max_concurrent_drift_checks - len(self._checks)
        if free > 0:
            for key in self._check_due.pop_due(now, limit=free):
                slot = self._slots.get(key)
                if slot is None or slot.view is None:
                    continue
                if slot.task is not None:  # a refresh is in flight: check when it is over
                    self._check_due.set(key, now + self.settings.busy_retry_seconds)
                    continue
                self._start(key, self._check, self._checks)
        # With every check slot taken, an overdue check is not a reason to wake: the check that ends wakes the
        # loop (``_start``). Counting it made the loop spin, one turn per event-loop turn, through each
        # burst of overdue drift checks (after a mass creation or a restart), holding the interpreter lock.
        # The same holds for a database whose refreshes fill its room: the one that ends wakes the loop.
        checks_may_start = len(self._checks) < self.settings.max_concurrent_drift_checks
        upcoming = [
            t
            for t in (
                *(queue.next_at() for queue in refreshes_may_start),
                self._check_due.next_at() if checks_may_start else None,
            )
            if t is not None
        ]
        self._sleep_until = min([now + MAX_SLEEP_SECONDS, *upcoming])
        self.refresher.metrics.scheduler(
            scheduled=self.scheduled(),
            running=len(self._refreshes),
            waiting=self.refresher.waiting() + self._overdue(now),
            lanes=self.refresher.refresh_lanes(),
        )
        return self._sleep_until

    async def run(self) -> None:
        """Start what is due, sleep until the next due time or a put that brings one closer; until cancelled."""
        while True:
            until = self.step()
            self._wake.clear()
            # asyncio.timeout, not wait_for: this runs after every refresh, and wait_for makes a task each time.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, until - self.clock())):
                    await self._wake.wait()

    async def stop(self, grace_seconds: float = 20.0) -> None:
        """Cancel all work in flight (statements are cancelled server-side) and wait for it to end."""
        tasks = [*self._refreshes, *self._checks]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=grace_seconds)

    async def settled(self) -> None:
        """Until no work is in flight (for tests and one-shot runs)."""
        while self._refreshes or self._checks:
            await asyncio.wait([*self._refreshes, *self._checks])

    def in_flight(self) -> int:
        return len(self._refreshes) + len(self._checks)

    def _overdue(self, now: float) -> int:
        """Refreshes due but left in a full database's queue (they count in the queue depth, as waiting).
        Counted at most once a second: the loop turns after every refresh, and a backlog can be thousands."""
        if now - self._overdue_counted_at >= 1.0 or now < self._overdue_counted_at:
            full = [queue for database, queue in self._refresh_due.items() if self._refresh_room(database) <= 0]
            self._overdue_count = sum(queue.count_due(now) for queue in full)
            self._overdue_counted_at = now
        return self._overdue_count

    def _start_refresh(self, key: str, database: Database) -> None:
        self._refreshing[database] = self._refreshing.get(database, 0) + 1
        self._start(key, self._refresh, self._refreshes, ended=lambda: self._refresh_ended(database))

    def _refresh_ended(self, database: Database) -> None:
        left = self._refreshing[database] - 1
        if left:
            self._refreshing[database] = left
        else:
            del self._refreshing[database]

    def _startable(self, key: str) -> bool:
        slot = self._slots.get(key)
        return slot is not None and slot.task is None and slot.ready and slot.view is not None

    def _start(
        self,
        key: str,
        body: Callable[[str, _Slot], Coroutine[Any, Any, None]],
        tasks: set[asyncio.Task[None]],
        ended: Callable[[], None] | None = None,
    ) -> None:
        slot = self._slots[key]
        task = slot.task = asyncio.create_task(self._finish(key, slot, body(key, slot)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        if ended is not None:
            task.add_done_callback(lambda _: ended())
        # A check slot or a database's room is free, or a put came in meanwhile.
        task.add_done_callback(lambda _: self._wake.set())

    async def _finish(self, key: str, slot: _Slot, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        finally:
            slot.task = None
            if self._slots.get(key) is slot:
                self._reschedule(key)

    # --- refreshes ---------------------------------------------------------------------------------

    async def _refresh(self, key: str, slot: _Slot) -> None:
        view = slot.view
        assert view is not None  # _startable
        request = slot.request
        manual = request is not None and request != slot.track.handled_request
        try:
            await self._after_upstream(key, slot, view)
            result = await self.work.refresh(key, view, manual=manual, due_at=None if manual else slot.due_at)
        except asyncio.CancelledError:
            raise
        except Exception:  # never lose the view from the schedule: log, back off as after a failure, go on
            logger.exception("%s: refresh round failed", key)
            result = None
        now = self._now()
        retry, busy = self.settings.retry_seconds, self.settings.busy_retry_seconds
        if result is None:
            slot.track = schedule.after(view, slot.track, Outcome.FAILURE, now, retry)
            return
        if result.busy:  # an apply or drift check holds the view: nothing happened, nothing to report
            slot.track = schedule.after(view, slot.track, Outcome.BUSY, now, retry, busy_seconds=busy)
            return
        handled = request if manual else None
        slot.track = schedule.after(
            view, slot.track, result.result, now, retry, completed=result.completed_at, request=handled
        )
        hold = slot.track.hold_until
        report = Report(
            next_due=schedule.due_at(view, slot.track, now),
            retry_in_seconds=(hold - now).total_seconds() if result.result == Outcome.FAILURE and hold else None,
            handled_request=handled,
        )
        try:
            await self.sink.refreshed(key, view, result, report)
        except asyncio.CancelledError:
            raise
        except Exception:  # a report that failed (status write) changes nothing about the refresh
            logger.exception("%s: could not report the refresh", key)

    async def _after_upstream(self, key: str, slot: _Slot, view: MaterializedView) -> None:
        """Wait for the work in flight of the views this one reads. A wait that would close a circle (names
        only seem to: a.x reads b.y in one database, b.y reads a.x in another) is left out, so none deadlocks."""
        if slot.reads is None:
            try:
                slot.reads = await self.work.reads(key, view)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # ordering is an optimisation: refresh anyway, ask again next time
                logger.warning("%s: cannot read what the view reads: %s", key, exc)
                return
        waits = []
        for relation in slot.reads:
            for other_key in self._stored_as.get(relation, ()):
                other = self._slots.get(other_key)
                if other is None or other is slot or other.task is None or self._waits_on(other_key, key):
                    continue
                slot.waits_for.add(other_key)
                waits.append(other.task)
        try:
            for task in waits:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.shield(task)
        finally:
            slot.waits_for.clear()

    def _waits_on(self, key: str, target: str) -> bool:
        """key's refresh waits, directly or through others, for target's work."""
        seen, pending = set(), [key]
        while pending:
            current = pending.pop()
            if current == target:
                return True
            slot = self._slots.get(current)
            if current not in seen and slot is not None:
                seen.add(current)
                pending.extend(slot.waits_for)
        return False

    # --- applies and drift checks ------------------------------------------------------------------

    async def _check(self, key: str, slot: _Slot) -> None:
        view = slot.view
        assert view is not None
        drift_check = slot.ready or not self.work.applies
        try:
            applied = await self.work.apply(key, view, drift_check=drift_check)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("%s: %s failed", key, "drift check" if drift_check else "apply")
            applied = Applied(Outcome.FAILURE, message=str(exc), error=exc)
        now = self._now()
        if applied.reads is not None:
            slot.reads = applied.reads
        next_in = self._after_check(key, applied) if drift_check else self._after_apply(key, slot, view, applied, now)
        self._set(self._check_due, key, self.clock() + next_in)
        self.sink.applied(key, view, applied, drift_check=drift_check, next_in=next_in)

    def _after_check(self, key: str, applied: Applied) -> float:
        """Seconds until the next drift check of an applied view: after a success, its next slot on the view's
        spread grid (however late this one ran)."""
        period = self.settings.drift_check_seconds
        if applied.outcome == Outcome.BUSY:  # the view's refreshes go on; only the check waits
            return self.settings.busy_retry_seconds
        if applied.outcome == Outcome.FAILURE:
            return min(period, applied.retry_seconds or self.settings.retry_seconds)
        now = self.clock()
        return schedule.next_on_spread(key, period, now) - now

    def _after_apply(self, key: str, slot: _Slot, view: MaterializedView, applied: Applied, now: dt.datetime) -> float:
        """The view's state after an apply of a spec not applied yet; seconds until the next apply or check."""
        busy, retry = self.settings.busy_retry_seconds, self.settings.retry_seconds
        if applied.outcome == Outcome.SUCCESS:
            last = applied.last_success or slot.track.last_success
            slot.track = dataclasses.replace(
                slot.track, last_success=last, failures=0, hold_until=None, busy_until=None
            )
            slot.ready = True
            period = self.settings.drift_check_seconds
            first, slot.checked = not slot.checked, True
            return (schedule.spread_offset(key, period) or period) if first else period
        outcome = Outcome.BUSY if applied.outcome == Outcome.BUSY else Outcome.FAILURE
        slot.track = schedule.after(view, slot.track, outcome, now, retry, busy_seconds=busy)
        hold = schedule.held_until(slot.track)
        return max(0.0, (hold - now).total_seconds()) if hold is not None else retry
