"""The slots of one database's lane, which grow while work waits and shrink back when it stops, and whose
waiting work starts in the thread of the work that ends.

A fixed cap is either too small for a burst (after a mass creation, or two slow views holding both slots,
every other due refresh waits and starts late) or too big for the steady state (every extra slot is a
connection and a backend). So a lane starts with ``floor`` slots; when the oldest waiter has waited
``grow_after_seconds`` it gets one more slot, up to ``ceiling``; after ``shrink_after_seconds`` in which
nobody waited, it gives one back. A slot is taken in the order of arrival (no overtaking), and work taken
back while it waits (``withdraw``) never runs.

Waiting work is a job, not a task parked on a future: the thread whose job ends takes the next waiting job
and runs it at once. Handing a slot over through the event loop (the thread's result travels to the loop,
the loop releases the slot, wakes the waiter, which then submits its job to a thread) left each refresh lane
idle 10% of the time in ``matview run`` (1 ms of a 9 ms refresh), longer whenever the loop was busy.

``submit`` and ``check`` (the growth's timer) run on the event loop; the jobs and their hand-overs run in the
executor's threads; one lock keeps the count. The clock is injected so the rules are tested without waiting.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class _Waiting:
    since: float
    job: Callable[[], Any]
    future: Future[Any]


class Slots:
    """floor to ceiling jobs at once, in executor's threads; waiting jobs run in the thread that frees a slot."""

    def __init__(
        self,
        floor: int,
        ceiling: int,
        grow_after_seconds: float,
        shrink_after_seconds: float,
        executor: Executor,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= floor <= ceiling:
            raise ValueError(f"slots: need 1 <= floor ({floor}) <= ceiling ({ceiling})")
        self.floor, self.ceiling = floor, ceiling
        self.limit = floor
        """Slots open now."""
        self.busy = 0
        """Slots taken: jobs running, or about to in a thread of their own."""
        self._grow_after, self._shrink_after = grow_after_seconds, shrink_after_seconds
        self._executor = executor
        self._clock = clock
        self._lock = threading.Lock()
        self._waiters: collections.deque[_Waiting] = collections.deque()
        self._last_wait = clock()
        self._timer: asyncio.TimerHandle | None = None

    def waiting(self) -> int:
        return len(self._waiters)

    def submit(self, job: Callable[[], T], waiting_since: float | None = None) -> Future[T]:
        """Run job in a thread once a slot is free, in the order of arrival; its outcome comes in the future.
        waiting_since (this clock): when the work began to wait, if before now: a due refresh the scheduler
        kept in its due-queue has waited there, and counts it. On the event loop (the growth's timer is on it)."""
        future: Future[T] = Future()
        with self._lock:
            start = self.busy < self.limit and not self._waiters
            if start:
                self.busy += 1
            else:
                now = self._clock()
                since = min(now, waiting_since) if waiting_since is not None else now
                self._waiters.append(_Waiting(since, job, future))
                self._last_wait = now
        if start:
            self._start(job, future)
        else:
            self._arm()
        return future

    def withdraw(self, future: Future[Any]) -> bool:
        """Take back a job that still waits: it never runs, and its future is cancelled. False once it started."""
        with self._lock:
            entry = next((entry for entry in self._waiters if entry.future is future), None)
            if entry is None:
                return False
            self._waiters.remove(entry)
        future.cancel()
        return True

    def cancel_waiting(self) -> None:
        """Cancel every job that still waits (the lane is closing: no thread would take them)."""
        with self._lock:
            waiting = list(self._waiters)
            self._waiters.clear()
        for entry in waiting:
            entry.future.cancel()

    def _start(self, job: Callable[[], Any], future: Future[Any]) -> None:
        """A thread for a job that holds a slot. An executor shut down (the process stops) cancels the job."""
        try:
            serving = self._executor.submit(self._serve, job, future)
        except RuntimeError:  # shut down already
            with self._lock:
                self.busy -= 1
            future.cancel()
            return
        serving.add_done_callback(lambda serving: future.cancel() if serving.cancelled() else None)

    def _serve(self, job: Callable[[], Any], future: Future[Any]) -> None:
        """In a thread of the executor, holding a slot: run job, then each job that waits when it ends."""
        while True:
            if future.set_running_or_notify_cancel():
                try:
                    result = job()
                except BaseException as exc:  # the future carries it to whoever awaits the job
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            with self._lock:
                if not self._waiters:
                    self._release_locked()
                    return
                waiting = self._waiters.popleft()
                if self._waiters:
                    self._last_wait = self._clock()
            job, future = waiting.job, waiting.future

    def _release_locked(self) -> None:
        self.busy -= 1
        now = self._clock()
        if self.limit > self.floor and now - self._last_wait >= self._shrink_after and self.busy < self.limit:
            self.limit -= 1
            self._last_wait = now  # one slot per quiet period, not all at once

    def _arm(self) -> None:
        """Look again when the oldest waiter will have waited long enough to earn a slot."""
        with self._lock:
            if self._timer is not None or not self._waiters or self.limit >= self.ceiling:
                return
            delay = max(0.0, self._waiters[0].since + self._grow_after - self._clock())
        self._timer = asyncio.get_running_loop().call_later(delay, self.check)

    def check(self) -> None:
        """Grow by one slot if the oldest waiter has waited long enough; at most one slot per
        ``grow_after_seconds``, so a queue of hundreds opens slots one by one, each seeing the last one's effect."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        started: _Waiting | None = None
        with self._lock:
            if not self._waiters or self.limit >= self.ceiling:
                return
            now = self._clock()
            if now - self._waiters[0].since >= self._grow_after:
                self.limit += 1
                self.busy += 1
                started = self._waiters.popleft()
                delay = self._grow_after
            else:
                delay = self._waiters[0].since + self._grow_after - now
            again = bool(self._waiters) and self.limit < self.ceiling
        if started is not None:
            self._start(started.job, started.future)
        if again:
            self._timer = asyncio.get_running_loop().call_later(delay, self.check)
