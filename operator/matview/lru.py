"""A bounded, thread-safe memory of the last things a process looked up, for facts worth not reading again.

The refresh lanes are threads, and views come and go for as long as the process lives: every memo the engine
keeps across refreshes must be safe to share between lanes and must not grow with the views ever seen. What
a memo remembers is the caller's to prove still true (or harmless when stale); this only bounds and guards.
"""

from __future__ import annotations

import collections
import threading
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Memo(Generic[K, V]):
    """The most recently stored ``size`` entries; storing one more forgets the least recently used."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: collections.OrderedDict[K, V] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def discard(self, key: K) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
