"""The slots of one database's lane, which grow while work waits and shrink back when it stops.

A fixed cap is either too small for a burst (after a mass creation, or two slow views holding both slots,
every other due refresh waits and starts late) or too big for the steady state (every extra slot is a
connection and a backend). So a lane starts with ``floor`` slots; when the oldest waiter has waited
``grow_after_seconds`` it gets one more slot, up to ``ceiling``; after ``shrink_after_seconds`` in which
nobody waited, it gives one back. A slot is taken in the order of arrival (no overtaking), and a cancelled
waiter takes nothing.

asyncio only (one event loop); the clock is injected so the rules are tested without waiting.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable


class Slots:
    """An asyncio semaphore whose limit follows the wait: ``floor`` to ``ceiling`` slots."""

    def __init__(
        self,
        floor: int,
        ceiling: int,
        grow_after_seconds: float,
        shrink_after_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= floor <= ceiling:
            raise ValueError(f"slots: need 1 <= floor ({floor}) <= ceiling ({ceiling})")
        self.floor, self.ceiling = floor, ceiling
        self.limit = floor
        """Slots open now."""
        self.busy = 0
        self._grow_after, self._shrink_after = grow_after_seconds, shrink_after_seconds
        self._clock = clock
        self._waiters: collections.deque[tuple[float, asyncio.Future[None]]] = collections.deque()
        self._last_wait = clock()
        self._timer: asyncio.TimerHandle | None = None

    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, waiting_since: float | None = None) -> None:
        """Take a slot, in the order of arrival. waiting_since (this clock): when the work began to wait, if
        before now: a due refresh the scheduler kept in its due-queue has waited there, and counts it."""
        if self.busy < self.limit and not self._waiters:
            self.busy += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        now = self._clock()
        entry = (min(now, waiting_since) if waiting_since is not None else now, future)
        self._waiters.append(entry)
        self._arm()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # granted in the same turn it was cancelled: give the slot on
            else:
                self._waiters.remove(entry)
            raise

    def release(self) -> None:
        self.busy -= 1
        if (
            not self._waiters
            and self.limit > self.floor
            and self._clock() - self._last_wait >= self._shrink_after
            and self.busy < self.limit
        ):
            self.limit -= 1
            self._last_wait = self._clock()  # one slot per quiet period, not all at once
        self._grant()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *_: object) -> None:
        self.release()

    def _grant(self) -> None:
        while self._waiters and self.busy < self.limit:
            _, future = self._waiters.popleft()
            if not future.done():
                self.busy += 1
                future.set_result(None)
        if self._waiters:
            self._last_wait = self._clock()

    def _arm(self) -> None:
        """Look again when the oldest waiter will have waited long enough to earn a slot."""
        self._last_wait = self._clock()
        if self._timer is None and self._waiters and self.limit < self.ceiling:
            delay = max(0.0, self._waiters[0][0] + self._grow_after - self._clock())
            self._timer = asyncio.get_running_loop().call_later(delay, self.check)

    def check(self) -> None:
        """Grow by one slot if the oldest waiter has waited long enough; at most one slot per
        ``grow_after_seconds``, so a queue of hundreds opens slots one by one, each seeing the last one's effect."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._waiters or self.limit >= self.ceiling:
            return
        now = self._clock()
        if now - self._waiters[0][0] >= self._grow_after:
            self.limit += 1
            self._grant()
            delay = self._grow_after
        else:
            delay = self._waiters[0][0] + self._grow_after - now
        if self._waiters and self.limit < self.ceiling:
            self._timer = asyncio.get_running_loop().call_later(delay, self.check)
