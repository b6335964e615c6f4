"""Parsing hostile text without crashing the process.

The C parser recurses once per nesting level and pglast's printer about six Python frames per level, so
every parse runs in one dedicated thread with a large stack (``PARSER.run``), its tree is measured without
recursion (``nesting_depth``) and refused beyond ``MAX_NESTING_DEPTH`` levels before it is checked and
re-printed, with a recursion limit that fits that depth. sqltext, the audited door, is its one user.
"""

from __future__ import annotations

import concurrent.futures
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from pglast import ast

_T = TypeVar("_T")

#: The deepest parse tree accepted (a chain ``a || b || c ...`` is one level per operator). PostgreSQL's
#: own limit depends on max_stack_depth; this one is stated in the CRD and docs/api.md.
MAX_NESTING_DEPTH = 1000
#: The parser thread's stack: the C parser needs a few hundred bytes per level, and the CRD bounds a
#: query to 131,072 characters, so no accepted input comes near it (pages are only committed when used).
_PARSER_STACK_BYTES = 512 * 1024 * 1024
#: Python frames the printer may need per tree level (measured: at most 6), plus headroom for callers.
_FRAMES_PER_LEVEL = 8
_FRAMES_BASE = 1000


class _ParserThread:
    """One long-lived thread with a large stack that runs every parse, one at a time."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def _serve(self) -> None:
        while True:
            job, future = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            # The recursion limit is per interpreter; it is raised only while a job runs on this big stack.
            previous = sys.getrecursionlimit()
            sys.setrecursionlimit(max(previous, _FRAMES_BASE + _FRAMES_PER_LEVEL * MAX_NESTING_DEPTH))
            try:
                future.set_result(job())
            except BaseException as exc:  # handed to the caller, who re-raises it in its own thread
                future.set_exception(exc)
            finally:
                sys.setrecursionlimit(previous)

    def run(self, job: Callable[[], _T]) -> _T:
        if threading.current_thread() is self._thread:
            return job()
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                previous = threading.stack_size()
                threading.stack_size(_PARSER_STACK_BYTES)
                try:
                    self._thread = threading.Thread(target=self._serve, name="matview-sql-parser", daemon=True)
                    self._thread.start()
                finally:
                    threading.stack_size(previous)
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        self._jobs.put((job, future))
        return future.result()


PARSER = _ParserThread()


def nesting_depth(node: Any) -> int:
    """Levels of the parse tree below node, counted without recursion."""
    deepest = 0
    pending: list[tuple[Any, int]] = [(node, 1)]
    while pending:
        current, depth = pending.pop()
        if isinstance(current, tuple):
            pending.extend((child, depth) for child in current)
        elif isinstance(current, ast.Node):
            deepest = max(deepest, depth)
            for slot in current.__slots__:  # type: ignore[attr-defined]
                child = getattr(current, slot)
                if isinstance(child, ast.Node | tuple):
                    pending.append((child, depth + 1))
    return deepest
