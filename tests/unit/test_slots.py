"""The refresh lane's slots: start at the floor, grow one at a time while work waits, never past the ceiling,
shrink back after a quiet period, first come first served. The clock is injected; ``check`` is what the
lane's timer calls."""

from __future__ import annotations

import asyncio

import pytest

from matview.refresh.slots import Slots


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def settle() -> None:
    """Let every task woken so far run up to its next wait."""
    for _ in range(5):
        await asyncio.sleep(0)


def slots(clock: Clock, floor: int = 2, ceiling: int = 4) -> Slots:
    # Timers that would fire on their own are pushed far out: the tests call check() themselves.
    return Slots(floor, ceiling, grow_after_seconds=1.0, shrink_after_seconds=60.0, clock=clock)


async def test_a_waiter_gets_a_new_slot_once_it_has_waited_long_enough_and_not_before() -> None:
    clock = Clock()
    lane = slots(clock)
    await lane.acquire()
    await lane.acquire()
    third = asyncio.create_task(lane.acquire())
    await settle()
    assert not third.done() and lane.waiting() == 1
    clock.now += 0.5
    lane.check()
    await settle()
    assert not third.done() and lane.limit == 2, "half the wait is not enough"
    clock.now += 0.5
    lane.check()
    await settle()
    assert third.done() and lane.limit == 3 and lane.busy == 3


async def test_a_refresh_overdue_in_the_scheduler_counts_its_wait_from_when_it_was_due() -> None:
    """The scheduler keeps overdue refreshes in its due-queue, not at the lane (#24), so few wait here and each
    briefly: at 10,000 views the lanes stayed at 2 of 4 while 6,000 refreshes were overdue. A waiter that says
    since when it waits earns its slot by that; one that says a future time counts from now."""
    clock = Clock()
    lane = slots(clock)
    await lane.acquire()
    await lane.acquire()
    overdue = asyncio.create_task(lane.acquire(waiting_since=clock.now - 30))
    await settle()
    lane.check()
    await settle()
    assert overdue.done() and lane.limit == 3, "due 30 s ago: the lane grows at once"
    early = asyncio.create_task(lane.acquire(waiting_since=clock.now + 30))
    await settle()
    clock.now += 0.5
    lane.check()
    await settle()
    assert not early.done() and lane.limit == 3
    clock.now += 0.5
    lane.check()
    await settle()
    assert early.done() and lane.limit == 4


async def test_a_long_queue_opens_one_slot_per_check_and_never_passes_the_ceiling() -> None:
    clock = Clock()
    lane = slots(clock, floor=1, ceiling=3)
    await lane.acquire()
    queued = [asyncio.create_task(lane.acquire()) for _ in range(10)]
    await settle()
    limits = []
    for _ in range(5):
        clock.now += 1.0
        lane.check()
        await settle()
        limits.append(lane.limit)
    assert limits == [2, 3, 3, 3, 3]
    assert sum(task.done() for task in queued) == 2 and lane.busy == 3
    for task in queued:
        task.cancel()
    await asyncio.gather(*queued, return_exceptions=True)
    assert lane.waiting() == 0 and lane.busy == 3, "cancelled waiters took nothing"


async def test_slots_are_handed_out_in_arrival_order() -> None:
    clock = Clock()
    lane = slots(clock, floor=1, ceiling=1)
    await lane.acquire()
    order: list[int] = []

    async def take(i: int) -> None:
        await lane.acquire()
        order.append(i)

    waiters = [asyncio.create_task(take(i)) for i in range(4)]
    await settle()
    for _ in range(4):
        lane.release()
        await settle()
    await asyncio.gather(*waiters)
    assert order == [0, 1, 2, 3]


async def test_a_grown_lane_gives_back_one_slot_per_quiet_period_down_to_its_floor() -> None:
    clock = Clock()
    lane = slots(clock, floor=2, ceiling=4)
    held = 2
    for _ in range(2):
        await lane.acquire()
    queued = [asyncio.create_task(lane.acquire()) for _ in range(2)]
    await settle()
    for _ in range(2):
        clock.now += 1.0
        lane.check()
        await settle()
    assert lane.limit == 4 and all(task.done() for task in queued)
    held += 2
    lane.release()  # someone waited a moment ago: no shrinking yet
    held -= 1
    assert lane.limit == 4
    clock.now += 61
    lane.release()
    held -= 1
    assert lane.limit == 3, "a quiet minute gives one slot back"
    lane.release()
    held -= 1
    assert lane.limit == 3, "the next one needs a quiet minute of its own"
    clock.now += 61
    lane.release()
    held -= 1
    clock.now += 61
    await lane.acquire()
    lane.release()
    assert held == 0 and lane.limit == 2, "never below the floor"


async def test_the_lanes_own_timer_grows_it_without_anyone_calling_check() -> None:
    lane = Slots(1, 2, grow_after_seconds=0.0, shrink_after_seconds=60.0)
    await lane.acquire()
    async with asyncio.timeout(30):  # bounds a hang only: the timer fires at once
        await lane.acquire()
    assert lane.limit == 2 and lane.busy == 2


@pytest.mark.parametrize(("floor", "ceiling"), [(0, 1), (3, 2)])
def test_a_floor_outside_one_to_the_ceiling_is_refused(floor: int, ceiling: int) -> None:
    with pytest.raises(ValueError, match="floor"):
        Slots(floor, ceiling, 1.0, 60.0)
