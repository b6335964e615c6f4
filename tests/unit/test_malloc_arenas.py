"""The long-running processes cap glibc's malloc arenas (issue #24): each thread that allocates gets an arena of
its own, up to eight per core, and memory freed in one is not reused by the others."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from matview.observe.memory import limit_malloc_arenas

# Eight threads alive at once, each allocating (a block above pymalloc's small-object limit, below the mmap
# threshold: from an arena); then glibc's own account of its heaps, one per arena.
PROBE = """
import ctypes, sys, threading
from matview.observe.memory import limit_malloc_arenas
if sys.argv[1] == "capped":
    assert limit_malloc_arenas(2)
barrier = threading.Barrier(8)
def work():
    held = [bytearray(20_000) for _ in range(50)]
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
libc = ctypes.CDLL(None)
libc.fdopen.restype = ctypes.c_void_p
out = libc.fdopen(1, b"w")
libc.malloc_info(0, ctypes.c_void_p(out))
libc.fflush(ctypes.c_void_p(out))
"""


def heaps(mode: str) -> int:
    environment = {key: value for key, value in os.environ.items() if key != "MALLOC_ARENA_MAX"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=environment, timeout=60
    )
    return done.stdout.count("<heap nr=")


def glibc() -> bool:
    import ctypes

    return hasattr(ctypes.CDLL(None), "gnu_get_libc_version")


@pytest.mark.skipif(not glibc() and not os.environ.get("CI"), reason="malloc arenas are glibc's")
def test_capped_arenas_are_shared_by_the_threads() -> None:
    assert heaps("default") > 2  # glibc's default: a new arena for each new thread
    assert heaps("capped") <= 2


def test_an_explicit_malloc_arena_max_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas(2) is False
