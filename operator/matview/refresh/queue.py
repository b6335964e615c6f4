"""A timer heap of due times: how one scheduler serves thousands of views without a task or timer each.

Each key (a view) has at most one due time. Changing or removing it does not search the heap: the old
entry stays and is recognised as stale when it reaches the top (its sequence number no longer matches),
so every operation is O(log n) and the heap holds at most one live entry per key plus the stale ones,
which ``compact`` drops when they outnumber the live ones.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class DueQueue(Generic[K]):
    """Keys ordered by due time (seconds since the epoch, or any clock the caller uses consistently)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []
        self._live: dict[K, tuple[float, int]] = {}
        self._sequence = itertools.count()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: object) -> bool:
        return key in self._live

    def at(self, key: K) -> float | None:
        """When key is due, or None when it is not queued."""
        found = self._live.get(key)
        return found[0] if found else None

    def set(self, key: K, due: float | None) -> None:
        """Queue key at due (replacing any earlier time); None takes it out."""
        if due is None:
            self._live.pop(key, None)
        else:
            entry = (due, next(self._sequence))
            self._live[key] = entry
            heapq.heappush(self._heap, (*entry, key))
        if len(self._heap) > 2 * len(self._live) + 64:
            self.compact()

    def discard(self, key: K) -> None:
        self.set(key, None)

    def next_at(self) -> float | None:
        """The earliest due time, or None when nothing is queued."""
        self._drop_stale_top()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float, limit: int | None = None) -> list[K]:
        """Take out and return the keys due at or before now, earliest first (at most limit of them)."""
        taken: list[K] = []
        while limit is None or len(taken) < limit:
            self._drop_stale_top()
            if not self._heap or self._heap[0][0] > now:
                break
            _, _, key = heapq.heappop(self._heap)
            del self._live[key]
            taken.append(key)
        return taken

    def count_due(self, now: float) -> int:
        """How many keys are due at or before now, without taking them out (walks only the heap's due part)."""
        count, pending = 0, [0] if self._heap else []
        while pending:
            index = pending.pop()
            due, sequence, key = self._heap[index]
            if due > now:  # a heap: nothing below is due either
                continue
            if self._live.get(key) == (due, sequence):
                count += 1
            pending.extend(child for child in (2 * index + 1, 2 * index + 2) if child < len(self._heap))
        return count

    def compact(self) -> None:
        """Rebuild the heap from the live entries only."""
        self._heap = [(due, sequence, key) for key, (due, sequence) in self._live.items()]
        heapq.heapify(self._heap)

    def _drop_stale_top(self) -> None:
        while self._heap:
            due, sequence, key = self._heap[0]
            if self._live.get(key) == (due, sequence):
                return
            heapq.heappop(self._heap)
