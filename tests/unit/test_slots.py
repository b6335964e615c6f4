"""The lane's slots: start at the floor, grow one at a time while work waits, never past the ceiling, shrink
back after a quiet period, first come first served; and a job that ends starts the next waiting job in its own
thread, without the event loop. The clock is injected; ``check`` is what the lane's timer calls. A
``HeldThreads`` executor keeps each submitted thread's work until the test runs it, so a slot stays taken
exactly as long as the test says."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Executor, Future, ThreadPoolExecutor
from typing import Any

import pytest

from matview.refresh.slots import Slots


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class HeldThreads(Executor):
    """An executor whose threads start only when the test says (``run``), in the test's own thread."""

    def __init__(self) -> None:
        self.held: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.held.append((fn, args))
        return Future()

    def run(self) -> None:
        """Run the oldest thread held: its job, and every job it takes over when that ends."""
        fn, args = self.held.pop(0)
        fn(*args)


async def settle() -> None:
    """Let every callback scheduled so far run."""
    for _ in range(5):
        await asyncio.sleep(0)


def slots(clock: Clock, threads: Executor, floor: int = 2, ceiling: int = 4) -> Slots:
    return Slots(floor, ceiling, grow_after_seconds=1.0, shrink_after_seconds=60.0, executor=threads, clock=clock)


def job(result: object = None) -> Callable[[], object]:
    return lambda: result


async def test_a_waiter_gets_a_new_slot_once_it_has_waited_long_enough_and_not_before() -> None:
    clock, threads = Clock(), HeldThreads()
    lane = slots(clock, threads)
    lane.submit(job())
    lane.submit(job())
    third = lane.submit(job("third"))
    assert lane.waiting() == 1 and len(threads.held) == 2
    clock.now += 0.5
    lane.check()
    assert lane.waiting() == 1 and lane.limit == 2, "half the wait is not enough"
    clock.now += 0.5
    lane.check()
    assert lane.waiting() == 0 and lane.limit == 3 and lane.busy == 3
    threads.run()
    threads.run()
    threads.run()
    assert third.result(timeout=0) == "third"


async def test_a_refresh_overdue_in_the_scheduler_counts_its_wait_from_when_it_was_due() -> None:
    """The scheduler keeps overdue refreshes in its due-queue, not at the lane (#24), so few wait here and each
    briefly: at 10,000 views the lanes stayed at 2 of 4 while 6,000 refreshes were overdue. A waiter that says
    since when it waits earns its slot by that; one that says a future time counts from now."""
    clock, threads = Clock(), HeldThreads()
    lane = slots(clock, threads)
    lane.submit(job())
    lane.submit(job())
    lane.submit(job(), waiting_since=clock.now - 30)
    lane.check()
    assert lane.waiting() == 0 and lane.limit == 3, "due 30 s ago: the lane grows at once"
    lane.submit(job(), waiting_since=clock.now + 30)
    clock.now += 0.5
    lane.check()
    assert lane.waiting() == 1 and lane.limit == 3
    clock.now += 0.5
    lane.check()
    assert lane.waiting() == 0 and lane.limit == 4


async def test_a_long_queue_opens_one_slot_per_check_and_never_passes_the_ceiling() -> None:
    clock, threads = Clock(), HeldThreads()
    lane = slots(clock, threads, floor=1, ceiling=3)
    lane.submit(job())
    queued = [lane.submit(job()) for _ in range(10)]
    limits = []
    for _ in range(5):
        clock.now += 1.0
        lane.check()
        limits.append(lane.limit)
    assert limits == [2, 3, 3, 3, 3]
    assert lane.busy == 3 and lane.waiting() == 8 and len(threads.held) == 3
    withdrawn = [lane.withdraw(future) for future in queued]
    assert withdrawn == [False, False] + [True] * 8, "the two that got a slot are no longer waiting"
    assert lane.waiting() == 0 and lane.busy == 3, "withdrawn waiters took nothing"
    assert all(future.cancelled() for future in queued[2:])


async def test_slots_are_handed_out_in_arrival_order_and_each_ending_job_starts_the_next() -> None:
    clock, threads = Clock(), HeldThreads()
    lane = slots(clock, threads, floor=1, ceiling=1)
    order: list[int] = []
    futures = [lane.submit(functools.partial(order.append, i)) for i in range(5)]
    assert len(threads.held) == 1 and lane.waiting() == 4
    threads.run()  # one thread: the first job, then each that waited, in turn
    assert order == [0, 1, 2, 3, 4]
    assert all(future.done() for future in futures) and lane.busy == 0 and not threads.held


async def test_a_job_that_fails_hands_its_error_to_its_future_and_its_slot_to_the_next() -> None:
    clock, threads = Clock(), HeldThreads()
    lane = slots(clock, threads, floor=1, ceiling=1)

    def fails() -> None:
        raise RuntimeError("boom")

    failing = lane.submit(fails)
    after = lane.submit(job("after"))
    threads.run()
    with pytest.raises(RuntimeError, match="boom"):
        failing.result(timeout=0)
    assert after.result(timeout=0) == "after" and lane.busy == 0


async def test_a_grown_lane_gives_back_one_slot_per_quiet_period_down_to_its_floor() -> None:
    clock, threads = Clock(), HeldThreads()
    lane = slots(clock, threads, floor=2, ceiling=4)
    for _ in range(4):
        lane.submit(job())
    for _ in range(2):
        clock.now += 1.0
        lane.check()
    assert lane.limit == 4 and lane.waiting() == 0 and len(threads.held) == 4
    threads.run()  # someone waited a moment ago: no shrinking yet
    assert lane.limit == 4
    clock.now += 61
    threads.run()
    assert lane.limit == 3, "a quiet minute gives one slot back"
    threads.run()
    assert lane.limit == 3, "the next one needs a quiet minute of its own"
    clock.now += 61
    threads.run()
    assert lane.limit == 2 and lane.busy == 0
    clock.now += 61
    lane.submit(job())
    threads.run()
    assert lane.limit == 2, "never below the floor"


async def test_the_lanes_own_timer_grows_it_without_anyone_calling_check() -> None:
    threads = HeldThreads()
    lane = Slots(1, 2, grow_after_seconds=0.0, shrink_after_seconds=60.0, executor=threads)
    lane.submit(job())
    lane.submit(job())
    async with asyncio.timeout(30):  # bounds a hang only: the timer fires at once
        while lane.waiting():
            await asyncio.sleep(0)
    assert lane.limit == 2 and lane.busy == 2 and len(threads.held) == 2


async def test_a_job_that_ends_starts_the_next_in_its_thread_while_the_event_loop_is_blocked() -> None:
    """The hand-over needs no turn of the event loop: this test holds the loop (a blocking wait) from the moment
    the first job may end until the second has run."""
    with ThreadPoolExecutor(2) as threads:
        lane = Slots(1, 1, grow_after_seconds=60.0, shrink_after_seconds=60.0, executor=threads)
        first_may_end, second_ran = threading.Event(), threading.Event()
        ran_in: list[int] = []

        def first() -> None:
            ran_in.append(threading.get_ident())
            assert first_may_end.wait(timeout=30)

        def second() -> None:
            ran_in.append(threading.get_ident())
            second_ran.set()

        lane.submit(first)
        lane.submit(second)
        assert lane.waiting() == 1
        first_may_end.set()
        assert second_ran.wait(timeout=30), "the second job never started while the event loop was held"
        assert ran_in[0] == ran_in[1], "it ran in the first job's thread"


async def test_jobs_that_no_thread_will_run_are_cancelled_not_left_waiting() -> None:
    threads = HeldThreads()
    lane = slots(Clock(), threads, floor=1, ceiling=1)
    lane.submit(job())
    waiting = lane.submit(job())
    lane.cancel_waiting()
    assert waiting.cancelled() and lane.waiting() == 0
    closed = ThreadPoolExecutor(1)
    closed.shutdown()
    lane = Slots(1, 1, 60.0, 60.0, executor=closed)
    refused = lane.submit(job())
    assert refused.cancelled() and lane.busy == 0
    with pytest.raises(CancelledError):
        refused.result(timeout=0)


@pytest.mark.parametrize(("floor", "ceiling"), [(0, 1), (3, 2)])
def test_a_floor_outside_one_to_the_ceiling_is_refused(floor: int, ceiling: int) -> None:
    with pytest.raises(ValueError, match="floor"):
        Slots(floor, ceiling, 1.0, 60.0, executor=HeldThreads())
