"""The process's memory as the kernel's OOM killer sees it: its container's limit and working set.

A pod is killed when its cgroup's memory cannot be reclaimed below the limit, whatever the process's own RSS
says, and the kubelet reports the same "working set" (usage less the inactive file cache, which the kernel
reclaims first). At thousands of views the operator grew past the shipped limit within a minute and would
have restarted in a loop; exporting the limit and the working set lets an alert fire while there is still
room (``MatviewOperatorNearMemoryLimit``).

cgroup v2 (``memory.max``) and v1 (``memory.limit_in_bytes``) are both read, from the process's own cgroup
(``/proc/self/cgroup``) or the namespace's root. No limit (``max``, or v1's "unlimited" sentinel), or no
cgroup at all (not Linux): ``limit_bytes`` is None and the working set is the process's own RSS (an
unlimited cgroup may hold much else, a laptop's whole session).

``keep_trimming`` hands the pages glibc keeps free back to the kernel now and then, so that the working set
follows what the process holds rather than its highest burst.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: cgroup v1 reports "no limit" as the largest page-aligned signed 64-bit number; anything above a petabyte is
#: treated as unlimited.
_UNLIMITED_ABOVE = 1 << 50


@dataclass(frozen=True)
class MemoryFiles:
    """Where one cgroup's memory files are, and which version's names they use."""

    directory: Path
    v2: bool

    def limit_bytes(self) -> int | None:
        text = _read(self.directory / ("memory.max" if self.v2 else "memory.limit_in_bytes"))
        if text is None or not text.isdigit():
            return None  # "max", or unreadable
        value = int(text)
        return value if 0 < value < _UNLIMITED_ABOVE else None

    def working_set_bytes(self) -> int | None:
        usage = _read(self.directory / ("memory.current" if self.v2 else "memory.usage_in_bytes"))
        if usage is None or not usage.isdigit():
            return None
        inactive = _stat(self.directory / "memory.stat", "inactive_file" if self.v2 else "total_inactive_file")
        return max(0, int(usage) - (inactive or 0))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _stat(path: Path, key: str) -> int | None:
    text = _read(path)
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return None


def find_memory_files(root: Path = Path("/")) -> MemoryFiles | None:
    """The memory files of this process's cgroup, when they state a limit. Without one the cgroup may hold
    much else (a laptop's whole session), so its usage would not be this process's."""
    mounts = root / "sys/fs/cgroup"
    own = _read(root / "proc/self/cgroup") or ""
    candidates: list[MemoryFiles] = []
    for line in own.splitlines():
        if line.count(":") < 2:
            continue  # not "hierarchy:controllers:path"
        _, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        if controllers == "":  # the v2 unified hierarchy
            candidates += [MemoryFiles(mounts / relative, True), MemoryFiles(mounts, True)]
        elif "memory" in controllers.split(","):
            candidates += [MemoryFiles(mounts / "memory" / relative, False), MemoryFiles(mounts / "memory", False)]
    return next(
        (files for files in candidates if files.limit_bytes() is not None and files.working_set_bytes() is not None),
        None,
    )


def resident_bytes(root: Path = Path("/")) -> int | None:
    """The process's resident set (where no cgroup says more)."""
    statm = _read(root / "proc/self/statm")
    fields = (statm or "").split()
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE") if len(fields) > 1 and fields[1].isdigit() else None


class MemoryWatch:
    """The limit and working set, read from the files again at every call (a scrape)."""

    def __init__(self, root: Path = Path("/")) -> None:
        self._root = root
        self._files = find_memory_files(root)

    def limit_bytes(self) -> int | None:
        return self._files.limit_bytes() if self._files is not None else None

    def working_set_bytes(self) -> int | None:
        measured = self._files.working_set_bytes() if self._files is not None else None
        return measured if measured is not None else resident_bytes(self._root)


#: How often a long-running process hands the memory its C library holds free back to the kernel.
TRIM_EVERY_SECONDS = 60.0


#: glibc's mallopt parameter for the most arenas.
M_ARENA_MAX = -8


def _glibc(name: str, *argtypes: Any) -> Any:
    """glibc's function name (returning an int), or None where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl and others lack it
        function = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = list(argtypes), ctypes.c_int
    return function


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas (before the worker threads start); False where the C library is not glibc or
    MALLOC_ARENA_MAX is set (the operator's own choice wins)."""
    mallopt = _glibc("mallopt", ctypes.c_int, ctypes.c_int)
    if os.environ.get("MALLOC_ARENA_MAX") or mallopt is None:
        return False
    return bool(mallopt(M_ARENA_MAX, arenas))


def trim_freed_memory() -> bool:
    """Ask glibc to return the free pages of its heaps to the kernel (malloc_trim); False elsewhere.

    glibc keeps what a burst freed (a mass creation decodes and validates thousands of objects at once) for
    the next allocation, in pages spread over its heaps, so the resident set, and the container's working set
    the OOM killer goes by, stay at the burst's peak for the life of the process."""
    malloc_trim = _glibc("malloc_trim", ctypes.c_size_t)
    return malloc_trim is not None and bool(malloc_trim(0))


async def keep_trimming(period_seconds: float = TRIM_EVERY_SECONDS) -> None:
    """trim_freed_memory every period, in a thread (it walks the heaps), until cancelled."""
    while True:
        await asyncio.sleep(period_seconds)
        await asyncio.to_thread(trim_freed_memory)
