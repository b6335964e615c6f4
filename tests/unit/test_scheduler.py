"""The one scheduler's rules, driven with an injected clock and a scripted feeder: no database, no
Kubernetes, no sleeping. Both feeders (the operator's watch, ``matview run``'s files) get exactly these."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from matview.api.spec import MaterializedView
from matview.observe.metrics import RefreshMetrics
from matview.outcomes import NO_MODE, FailureReason, Outcome
from matview.refresh import RefreshResult, schedule
from matview.refresh.feeding import Applied, Relation, Report
from matview.refresh.refresher import Refresher
from matview.refresh.scheduler import Scheduler
from matview.refresh.settings import RunnerSettings
from tests.helpers import view

T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC).timestamp()


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def at(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.now, dt.UTC)


@dataclass
class Call:
    what: str
    key: str
    at: float
    manual: bool = False
    drift_check: bool = False


@dataclass
class Feeder:
    """A scripted Work and Sink: each call is recorded with the clock; outcomes come from the test."""

    clock: Clock
    applies: bool = True
    calls: list[Call] = field(default_factory=list)
    refresh_outcome: Callable[[str], Any] = lambda key: Outcome.SUCCESS
    """A key → an Outcome, "busy", None (the round could not start) or an exception to raise."""
    apply_outcome: Callable[[str], Any] = lambda key: Outcome.SUCCESS
    read: dict[str, frozenset[Relation]] = field(default_factory=dict)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    """A refresh of a key with a gate waits until the test opens it."""
    running: set[str] = field(default_factory=set)
    reports: list[tuple[str, RefreshResult, Report]] = field(default_factory=list)
    applied_reports: list[tuple[str, Applied, bool, float]] = field(default_factory=list)
    scheduled_at: dict[str, dt.datetime | None] = field(default_factory=dict)
    fail_reports: bool = False

    async def refresh(
        self, key: str, view: MaterializedView, *, manual: bool, due_at: float | None
    ) -> RefreshResult | None:
        self.calls.append(Call("refresh", key, self.clock.now, manual=manual))
        self.running.add(key)
        try:
            if key in self.gates:
                await self.gates[key].wait()
        finally:
            self.running.discard(key)
        outcome = self.refresh_outcome(key)
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome is None:
            return None
        at = self.clock.at()
        busy = outcome == "busy"
        return RefreshResult(
            view.relation,
            NO_MODE if busy else "Concurrent",
            Outcome.SKIPPED if busy else outcome,
            "test",
            at,
            at,
            0.0,
            failure_reason=FailureReason.OTHER if outcome == Outcome.FAILURE else None,
            busy=busy,
        )

    async def apply(self, key: str, view: MaterializedView, *, drift_check: bool) -> Applied:
        self.calls.append(Call("apply", key, self.clock.now, drift_check=drift_check))
        outcome = self.apply_outcome(key)
        if isinstance(outcome, BaseException):
            raise outcome
        return Applied(outcome, reads=self.read.get(key) if outcome == Outcome.SUCCESS else None)

    async def reads(self, key: str, view: MaterializedView) -> frozenset[Relation]:
        return self.read.get(key, frozenset())

    def scheduled(self, key: str, view: MaterializedView, due: dt.datetime | None, now: dt.datetime) -> None:
        self.scheduled_at[key] = due

    async def refreshed(self, key: str, view: MaterializedView, result: RefreshResult, report: Report) -> None:
        self.reports.append((key, result, report))
        if self.fail_reports:
            raise RuntimeError("the status write failed")

    def applied(self, key: str, view: MaterializedView, applied: Applied, *, drift_check: bool, next_in: float) -> None:
        self.applied_reports.append((key, applied, drift_check, next_in))

    def times(self, what: str, key: str | None = None, **match: Any) -> list[float]:
        return [
            c.at - T0
            for c in self.calls
            if c.what == what
            and (key is None or c.key == key)
            and all(getattr(c, name) == value for name, value in match.items())
        ]


@pytest.fixture
def world() -> Any:
    made: list[Refresher] = []

    def make(applies: bool = True, **settings: Any) -> tuple[Scheduler, Feeder, Clock]:
        clock = Clock()
        feeder = Feeder(clock, applies=applies)
        defaults: dict[str, Any] = {"retry_seconds": 10.0, "busy_retry_seconds": 2.0, "drift_check_seconds": 1000.0}
        refresher = Refresher(RefreshMetrics(), RunnerSettings(**{**defaults, **settings}))
        made.append(refresher)
        return Scheduler(refresher, feeder, feeder, clock), feeder, clock

    yield make
    for refresher in made:
        refresher.close()


async def run_until(scheduler: Scheduler, clock: Clock, seconds: float) -> None:
    """Run the loop on the fake clock: start what is due, let it finish, jump to the next due time."""
    end = T0 + seconds
    while True:
        until = scheduler.step()
        if scheduler.in_flight():
            await scheduler.settled()
            continue
        if clock.now >= end:
            return
        clock.now = min(max(until, clock.now), end)


async def until_true(condition: Callable[[], bool]) -> None:
    """Let the event loop run until condition holds (work in flight awaits only the test's gates)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


def hourly(name: str = "a", **spec: Any) -> MaterializedView:
    return view(name, refresh={"interval": "1h"}, **spec)


async def test_a_new_view_is_applied_then_refreshed_then_refreshed_every_interval(world: Any) -> None:
    scheduler, feeder, clock = world()
    v = view("a", refresh={"interval": "60s"})
    scheduler.put(v.owner, v)
    await run_until(scheduler, clock, 200)
    assert feeder.times("apply") == [0]
    refreshes = feeder.times("refresh")
    jitter = schedule.jitter_seconds(v.owner, 60)
    assert refreshes == pytest.approx([0, 60 + jitter, 120 + 2 * jitter, 180 + 3 * jitter])
    assert not any(c.manual for c in feeder.calls)


async def test_a_restarted_process_neither_refreshes_early_nor_skips(world: Any) -> None:
    scheduler, feeder, clock = world(applies=False)
    v = view("a", refresh={"interval": "60s"})
    last = dt.datetime.fromtimestamp(T0 - 30, dt.UTC)
    scheduler.put(v.owner, v, ready=True, last_success=last)
    await run_until(scheduler, clock, 90)
    assert feeder.times("refresh") == pytest.approx([30 + schedule.jitter_seconds(v.owner, 60)])
    assert feeder.times("apply") == [], "the operator's first applies are kopf's"


@pytest.mark.parametrize("failing", ["failure", "could not start", "raises"])
async def test_a_failing_refresh_backs_off_doubling_up_to_the_period(world: Any, failing: str) -> None:
    scheduler, feeder, clock = world()
    outcome: Any = {"failure": Outcome.FAILURE, "could not start": None, "raises": RuntimeError("boom")}[failing]
    feeder.refresh_outcome = lambda key: outcome
    v = view("a", refresh={"interval": "100s"})
    scheduler.put(v.owner, v)
    await run_until(scheduler, clock, 600)
    times = feeder.times("refresh")
    gaps = [round(b - a) for a, b in itertools.pairwise(times)]
    assert gaps[:4] == [10, 20, 40, 80] and set(gaps[4:]) == {100}, gaps
    if failing == "failure":
        assert [report.retry_in_seconds for _, _, report in feeder.reports[:3]] == [10, 20, 40]


async def test_a_busy_view_is_looked_at_again_after_the_busy_delay_even_when_it_is_longer(world: Any) -> None:
    """busy_retry_seconds was a cap (min with 2 s) in the operator: a longer setting was ignored."""
    scheduler, feeder, clock = world(busy_retry_seconds=7.0)
    attempts = iter(["busy", "busy", Outcome.SUCCESS])
    feeder.refresh_outcome = lambda key: next(attempts)
    v = hourly()
    scheduler.put(v.owner, v)
    await run_until(scheduler, clock, 60)
    assert feeder.times("refresh") == [0, 7, 14]
    assert len(feeder.reports) == 1, "a busy look reports nothing"


async def test_each_manual_request_is_acted_on_once_and_a_busy_one_waits(world: Any) -> None:
    scheduler, feeder, clock = world(applies=False)
    v = hourly()
    now = dt.datetime.fromtimestamp(T0, dt.UTC)
    scheduler.put(v.owner, v, ready=True, last_success=now, handled_request="old")
    await run_until(scheduler, clock, 10)
    assert feeder.times("refresh") == []
    scheduler.put(v.owner, v, ready=True, last_success=now, request="old")  # handled before a restart
    await run_until(scheduler, clock, 20)
    assert feeder.times("refresh") == []

    outcomes = iter(["busy", Outcome.FAILURE])
    feeder.refresh_outcome = lambda key: next(outcomes)
    scheduler.put(v.owner, v, ready=True, request="r1")
    await run_until(scheduler, clock, 40)
    assert feeder.times("refresh", manual=True) == [20, 22], "busy: asked again; failed: handled, not repeated"
    assert [report.handled_request for _, _, report in feeder.reports] == ["r1"]
    scheduler.put(v.owner, v, ready=True, request="r1")
    feeder.refresh_outcome = lambda key: Outcome.SUCCESS
    await run_until(scheduler, clock, 50)
    assert feeder.times("refresh", manual=True) == [20, 22]
    scheduler.put(v.owner, v, ready=True, request="r2")
    await run_until(scheduler, clock, 60)
    assert feeder.times("refresh", manual=True) == [20, 22, 50]


async def test_a_view_refreshes_after_the_views_it_reads_that_are_due_with_it(world: Any) -> None:
    scheduler, feeder, _ = world(applies=False)
    upstream, downstream, other = hourly("up"), hourly("down"), hourly("other")
    feeder.read = {downstream.owner: frozenset({(upstream.schema, upstream.name)})}
    feeder.gates = {upstream.owner: asyncio.Event(), other.owner: asyncio.Event()}
    for v in (downstream, other, upstream):  # the downstream view first: it must still wait
        scheduler.put(v.owner, v, ready=True)
    scheduler.step()
    await until_true(lambda: feeder.running == {upstream.owner, other.owner})
    assert downstream.owner not in feeder.running
    feeder.gates[upstream.owner].set()
    await until_true(lambda: downstream.owner in {c.key for c in feeder.calls})
    feeder.gates[other.owner].set()
    await scheduler.settled()
    refreshed = [c.key for c in feeder.calls if c.what == "refresh"]
    assert refreshed.index(downstream.owner) > refreshed.index(upstream.owner)


async def test_views_that_seem_to_read_each_other_never_wait_for_each_other(world: Any) -> None:
    """Names only: a.x reads b.y in one database and b.y reads a.x in another. A wait that would close the
    circle is left out, so neither waits forever."""
    scheduler, feeder, clock = world(applies=False)
    first, second = hourly("first"), hourly("second")
    feeder.read = {
        first.owner: frozenset({(second.schema, second.name)}),
        second.owner: frozenset({(first.schema, first.name)}),
    }
    for v in (first, second):
        scheduler.put(v.owner, v, ready=True)
    await asyncio.wait_for(run_until(scheduler, clock, 1), timeout=10)
    assert sorted(feeder.times("refresh")) == [0, 0]


async def test_drift_checks_are_spread_then_periodic_and_back_off_when_busy_or_failing(world: Any) -> None:
    scheduler, feeder, clock = world(applies=False, drift_check_seconds=100.0, retry_seconds=30.0)
    v = view("a")  # no schedule: only drift checks
    outcomes = iter([Outcome.SUCCESS, Outcome.BUSY, Outcome.FAILURE, Outcome.SUCCESS, Outcome.SUCCESS])
    feeder.apply_outcome = lambda key: next(outcomes)
    scheduler.put(v.owner, v, ready=True)
    first = schedule.spread_offset(v.owner, 100)
    await run_until(scheduler, clock, first + 250)
    # After the late success at first + 132 the next check is back on the view's grid (T0 is a multiple of
    # the period, so the grid is first + k * 100), not a period after the late one.
    assert T0 % 100 == 0
    assert feeder.times("apply", drift_check=True) == pytest.approx(
        [first, first + 100, first + 102, first + 132, first + 200]
    )
    assert feeder.times("refresh") == []


def test_drift_checks_that_all_ran_late_return_to_their_even_spread() -> None:
    """After a burst (thousands of creations, a restart) every check ran in the same few seconds; the next
    round lands each on its own slot of the period again instead of repeating the burst."""
    period, keys = 300.0, [f"ns/view-{i}" for i in range(3000)]
    ran_at = [T0 + 1234.5 + i * 0.01 for i in range(len(keys))]  # all 3,000 within 30 s
    next_at = [schedule.next_on_spread(key, period, now) for key, now in zip(keys, ran_at, strict=True)]
    assert all(period / 2 <= at - now <= 1.5 * period for at, now in zip(next_at, ran_at, strict=True))
    next_round = sorted(next_at)
    per_slot = [0] * 30  # ten-second slots of one period after the first
    for at in next_round:
        per_slot[int((at - next_round[0]) // 10) % 30] += 1
    assert max(per_slot) < 2 * len(keys) / 30, per_slot  # even: no slot holds twice its share


async def test_a_new_spec_is_applied_when_the_refresh_in_flight_ends_and_without_the_old_backoff(
    world: Any,
) -> None:
    scheduler, feeder, clock = world()
    failing = {"yes": True}
    feeder.apply_outcome = lambda key: Outcome.FAILURE if failing["yes"] else Outcome.SUCCESS
    old = hourly()
    scheduler.put(old.owner, old)
    await run_until(scheduler, clock, 50)
    assert feeder.times("apply") == [0, 10, 30], "an apply that fails backs off like a refresh"
    assert feeder.times("refresh") == [], "no refresh before the spec is applied"
    assert [round(r[3]) for r in feeder.applied_reports] == [10, 20, 40]

    failing["yes"] = False
    edited = hourly(indexes=[{"columns": ["one"]}])
    scheduler.put(edited.owner, edited)  # a new spec: at once, not at 70
    await run_until(scheduler, clock, 60)
    assert feeder.times("apply") == [0, 10, 30, 50] and feeder.times("refresh") == [50]

    feeder.gates = {edited.owner: asyncio.Event()}
    scheduler.put(edited.owner, edited, request="now")
    scheduler.step()
    await until_true(lambda: edited.owner in feeder.running)
    again = hourly(indexes=[{"columns": ["one"], "unique": True}])
    scheduler.put(again.owner, again)
    scheduler.step()
    await asyncio.sleep(0)
    assert feeder.times("apply") == [0, 10, 30, 50], "never applied while its refresh runs"
    feeder.gates[edited.owner].set()
    await scheduler.settled()
    scheduler.step()
    await scheduler.settled()
    assert feeder.times("apply") == [0, 10, 30, 50, 60]


async def test_a_view_not_ready_in_the_operator_is_not_refreshed_nor_applied_at_once(world: Any) -> None:
    scheduler, feeder, clock = world(applies=False, drift_check_seconds=100.0)
    v = hourly()
    scheduler.put(v.owner, v, ready=False)
    await run_until(scheduler, clock, 50)
    assert feeder.times("refresh") == []
    assert all(c.drift_check and c.at - T0 >= schedule.spread_offset(v.owner, 100) for c in feeder.calls)
    scheduler.put(v.owner, v, ready=True)  # kopf applied it: the event says Ready
    await run_until(scheduler, clock, 51)
    assert feeder.times("refresh") == [50]


async def test_an_invalid_spec_runs_nothing_until_it_is_fixed(world: Any) -> None:
    scheduler, feeder, clock = world()
    v = hourly()
    scheduler.put(v.owner, None)
    await run_until(scheduler, clock, 2000)
    assert feeder.calls == []
    scheduler.put(v.owner, v)
    await run_until(scheduler, clock, 2001)
    assert feeder.times("apply") == [2000] and feeder.times("refresh") == [2000]


async def test_forget_cancels_the_work_in_flight_and_nothing_runs_after(world: Any) -> None:
    scheduler, feeder, clock = world(applies=False)
    v = view("a", refresh={"interval": "60s"})
    feeder.gates = {v.owner: asyncio.Event()}
    scheduler.put(v.owner, v, ready=True)
    scheduler.step()
    await until_true(lambda: v.owner in feeder.running)
    scheduler.forget(v.owner)
    await scheduler.settled()
    assert feeder.running == set() and feeder.reports == []
    await run_until(scheduler, clock, 1000)
    assert len(feeder.calls) == 1


async def test_drift_checks_run_a_few_at_a_time(world: Any) -> None:
    scheduler, feeder, clock = world(applies=False, max_concurrent_drift_checks=3, drift_check_seconds=1.0)
    most = 0
    in_flight = 0

    async def slow_apply(key: str, view: MaterializedView, *, drift_check: bool) -> Applied:
        nonlocal most, in_flight
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0)
        in_flight -= 1
        return Applied(Outcome.SUCCESS)

    feeder.apply = slow_apply
    views = [view(f"v{i}") for i in range(10)]
    for v in views:
        scheduler.put(v.owner, v, ready=True)
    clock.now = T0 + 1.0  # every first check is due
    while scheduler.step() <= clock.now or scheduler.in_flight():
        await scheduler.settled()
    assert most == 3


async def test_a_report_that_fails_is_not_a_failed_refresh(world: Any) -> None:
    scheduler, feeder, clock = world(applies=False)
    feeder.fail_reports = True
    v = view("a", refresh={"interval": "60s"})
    scheduler.put(v.owner, v, ready=True)
    await run_until(scheduler, clock, 100)
    assert feeder.times("refresh") == pytest.approx([0, 60 + schedule.jitter_seconds(v.owner, 60)])


async def test_the_next_run_is_told_to_the_sink_and_the_load_to_the_metrics(world: Any) -> None:
    scheduler, feeder, _ = world(applies=False)
    v = view("a", refresh={"interval": "60s"})
    last = dt.datetime.fromtimestamp(T0, dt.UTC)
    scheduler.put(v.owner, v, ready=True, last_success=last)
    assert feeder.scheduled_at[v.owner] == last + dt.timedelta(seconds=60 + schedule.jitter_seconds(v.owner, 60))
    scheduler.step()
    assert scheduler.refresher.metrics.scheduled._value.get() == 1


async def test_the_demand_gauge_follows_the_schedules_it_is_told_of(world: Any) -> None:
    """matview_refresh_demand_per_second: one over each scheduled view's period, summed; a view forgotten or
    made manual-only leaves it (the alert compares it with the refreshes completed)."""
    scheduler, _, clock = world()
    minute, half_minute = view("a", refresh={"interval": "60s"}), view("b", refresh={"interval": "30s"})
    scheduler.put(minute.owner, minute)
    scheduler.put(half_minute.owner, half_minute)
    await run_until(scheduler, clock, 5)
    registry = scheduler.refresher.metrics.registry

    def demand() -> float | None:
        summed: float | None = registry.get_sample_value("matview_refresh_demand_per_second")  # as a scrape reads it
        return summed

    assert demand() == pytest.approx(1 / 60 + 1 / 30)
    scheduler.forget(half_minute.owner)
    scheduler.refresher.metrics.forget(half_minute.namespace, half_minute.resource_name)
    assert demand() == pytest.approx(1 / 60)
    manual = view("a", refresh={"mode": "Full"})
    scheduler.put(manual.owner, manual)
    await run_until(scheduler, clock, 10)
    assert demand() == pytest.approx(0)


async def test_the_loop_sleeps_while_every_check_slot_is_taken_and_wakes_when_one_ends(world: Any) -> None:
    """An overdue drift check with no free slot is not work to wake for: before, the loop turned once per
    event-loop turn until a slot freed (a busy loop through each burst of overdue checks)."""
    scheduler, feeder, clock = world(applies=False, max_concurrent_drift_checks=1, drift_check_seconds=1.0)
    gate = asyncio.Event()
    checked: list[str] = []

    async def held_check(key: str, view: MaterializedView, *, drift_check: bool) -> Applied:
        checked.append(key)
        await gate.wait()
        return Applied(Outcome.SUCCESS)

    feeder.apply = held_check
    for name in ("a", "b"):
        v = hourly(name)
        scheduler.put(v.owner, v, ready=True, last_success=clock.at())
    clock.now = T0 + 1.0  # both first checks are overdue; one slot
    steps = 0
    step = scheduler.step

    def counted_step() -> float:
        nonlocal steps
        steps += 1
        wait: float = step()
        return wait

    scheduler.step = counted_step
    loop = asyncio.create_task(scheduler.run())
    try:
        await until_true(lambda: len(checked) == 1)
        for _ in range(200):
            await asyncio.sleep(0)
        assert len(checked) == 1
        assert steps <= 3, f"the loop turned {steps} times while the only check slot was taken"
        gate.set()
        await until_true(lambda: len(checked) == 2)  # the ended check woke the loop
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop


async def test_a_database_behind_keeps_its_overdue_views_queued_in_order_and_holds_up_no_other(world: Any) -> None:
    """A due refresh becomes a task only while its database has room (two per slot of its lane's ceiling):
    10,000 views once parked ~6,500 tasks waiting for two lanes. The rest wait in the database's due-queue,
    start in due order as room frees, and count in the queue depth; a view on another Secret starts at once."""
    scheduler, feeder, clock = world(applies=False, max_concurrent_per_database=2)
    gate = asyncio.Event()
    behind = [view(f"s{i}", refresh={"interval": "1h"}, database={"secretRef": {"name": "slow"}}) for i in range(10)]
    for i, v in enumerate(behind):
        feeder.gates[v.owner] = gate
        scheduler.put(v.owner, v, ready=True, last_success=clock.at() - dt.timedelta(hours=2, seconds=100 * i))
    due_order = sorted((v.owner for v in behind), key=lambda key: feeder.scheduled_at[key] or clock.at())
    assert all((feeder.scheduled_at[v.owner] or clock.at()) < clock.at() for v in behind), "all overdue"
    metrics = scheduler.refresher.metrics
    loop = asyncio.create_task(scheduler.run())
    try:
        await until_true(lambda: len(feeder.running) == 4)
        for _ in range(100):
            await asyncio.sleep(0)
        assert len(feeder.running) == 4 and scheduler.in_flight() == 4, "no more tasks than the room"
        assert [c.key for c in feeder.calls] == due_order[:4]
        assert (metrics.scheduled._value.get(), metrics.queue_depth._value.get()) == (6, 6)

        other = view("other", refresh={"interval": "1h"}, database={"secretRef": {"name": "fast"}})
        scheduler.put(other.owner, other, ready=True)
        await until_true(lambda: any(c.key == other.owner for c in feeder.calls))
        assert len(feeder.running) == 4, "the other database's refresh ran beside the stuck ones"

        gate.set()
        await until_true(lambda: len(feeder.reports) == 11 and scheduler.in_flight() == 0)
        assert [c.key for c in feeder.calls if c.key != other.owner] == due_order
        assert not scheduler._refreshing, "each ended task gave its room back"
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop


async def test_handed_refreshes_run_upstream_first_as_far_as_known_and_a_circle_ends(world: Any) -> None:
    """``matview refresh`` of several files handed to a run (cli/control.py): each view after those among them it
    reads, once; views reading each other (names only) and views whose reads are unknown keep the order given."""
    scheduler, feeder, clock = world()
    base, middle, top, alone = hourly("base"), hourly("middle"), hourly("top"), hourly("alone")
    first, second, unknown = hourly("first"), hourly("second"), hourly("unknown")
    feeder.read = {
        middle.owner: frozenset({(base.schema, base.name)}),
        top.owner: frozenset({(middle.schema, middle.name), (base.schema, base.name)}),
        first.owner: frozenset({(second.schema, second.name)}),
        second.owner: frozenset({(first.schema, first.name)}),
    }
    for v in (base, middle, top, alone, first, second):
        scheduler.put(v.owner, v)
    await run_until(scheduler, clock, 1)
    assert all(scheduler.ready(v.owner) for v in (base, middle, top, alone, first, second))
    assert not scheduler.ready(unknown.owner)
    asked = [top.owner, alone.owner, middle.owner, base.owner]
    assert scheduler.upstream_first(asked) == [base.owner, middle.owner, top.owner, alone.owner]
    assert scheduler.upstream_first([middle.owner, top.owner]) == [middle.owner, top.owner]
    circle = scheduler.upstream_first([first.owner, second.owner])
    assert sorted(circle) == sorted([first.owner, second.owner])
    assert scheduler.upstream_first([unknown.owner, base.owner]) == [unknown.owner, base.owner]
