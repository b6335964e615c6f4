"""matview.observe.memory reads the limit and working set the OOM killer goes by, from cgroup v2 or v1 files.

The file layouts are written out here as the kernel lays them out (the real thing, a container run with
--memory, is tests/e2e/test_image.py's); this checks the parsing and the choice between them."""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import generate_latest

from matview.observe import memory
from matview.observe.metrics import RefreshMetrics
from tests.conftest import skip_or_fail


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_cgroup_v2_limit_and_working_set_less_inactive_file(tmp_path: Path) -> None:
    root = tree(
        tmp_path,
        {
            "proc/self/cgroup": "0::/kubepods/pod1/c1\n",
            "proc/self/statm": "1000 500 0 0 0 0 0\n",
            "sys/fs/cgroup/memory.max": "536870912\n",
            "sys/fs/cgroup/memory.current": "300000000\n",
            "sys/fs/cgroup/memory.stat": "anon 200000000\nfile 100000000\ninactive_file 40000000\nactive_file 6\n",
        },
    )
    watch = memory.MemoryWatch(root)
    assert watch.limit_bytes() == 536870912
    assert watch.working_set_bytes() == 260000000
    (root / "sys/fs/cgroup/memory.current").write_text("310000000\n")  # read again at every scrape
    assert watch.working_set_bytes() == 270000000


def test_cgroup_v1_limit_from_the_memory_controller(tmp_path: Path) -> None:
    root = tree(
        tmp_path,
        {
            "proc/self/cgroup": "5:cpu,cpuacct:/x\n4:memory:/libpod_parent/libpod-1\n0::/\n",
            "sys/fs/cgroup/memory/memory.limit_in_bytes": "314572800\n",
            "sys/fs/cgroup/memory/memory.usage_in_bytes": "100000000\n",
            "sys/fs/cgroup/memory/memory.stat": "cache 5\ninactive_file 7\ntotal_inactive_file 20000000\n",
        },
    )
    watch = memory.MemoryWatch(root)
    assert (watch.limit_bytes(), watch.working_set_bytes()) == (314572800, 80000000)


def test_no_limit_means_no_limit_and_the_process_resident_set(tmp_path: Path) -> None:
    """An unlimited cgroup (a laptop's session) holds other processes too: its usage is not ours."""
    for limit_file, unlimited in (("memory.max", "max\n"), ("memory/memory.limit_in_bytes", "9223372036854771712\n")):
        root = tree(
            tmp_path / limit_file.replace("/", "_"),
            {
                "proc/self/cgroup": "4:memory:/\n0::/\n",
                "proc/self/statm": "1000 500 0 0 0 0 0\n",
                f"sys/fs/cgroup/{limit_file}": unlimited,
                "sys/fs/cgroup/memory.current": "9000000000\n",
                "sys/fs/cgroup/memory/memory.usage_in_bytes": "9000000000\n",
            },
        )
        watch = memory.MemoryWatch(root)
        assert watch.limit_bytes() is None, limit_file
        assert watch.working_set_bytes() == 500 * os.sysconf("SC_PAGE_SIZE"), limit_file


def test_garbage_in_the_files_is_no_limit_not_a_crash(tmp_path: Path) -> None:
    root = tree(
        tmp_path,
        {
            "proc/self/cgroup": "garbage\n::\n0::/../../etc\n",
            "sys/fs/cgroup/memory.max": "-5\n",
            "sys/fs/cgroup/memory.current": "lots\n",
            "sys/fs/cgroup/memory.stat": "inactive_file many\n",
        },
    )
    watch = memory.MemoryWatch(root)
    assert watch.limit_bytes() is None
    assert watch.working_set_bytes() is None  # no statm either: nothing to say, the gauge reads NaN


def test_the_gauges_exist_only_as_far_as_a_limit_does() -> None:
    exposition = generate_latest(RefreshMetrics().registry).decode()
    here = memory.MemoryWatch()
    assert "matview_memory_working_set_bytes " in exposition
    assert ("matview_memory_limit_bytes " in exposition) == (here.limit_bytes() is not None)
    assert ("matview_memory_headroom_bytes " in exposition) == (here.limit_bytes() is not None)


def test_trimming_hands_back_what_a_burst_freed_between_what_it_kept() -> None:
    """glibc keeps freed pages that lie between live allocations; malloc_trim returns them to the kernel. Here a
    burst of 20,000 large buffers interleaved with small ones that stay, as a mass creation leaves it."""
    import ctypes
    import os

    try:
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
    except AttributeError:
        skip_or_fail("the C library is not glibc: there is no malloc_trim to call")

    def resident_mib() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    burst, kept = [], []
    for _ in range(20_000):
        burst.append(bytearray(20_000))
        kept.append(bytearray(600))
    peak = resident_mib()
    del burst
    held = resident_mib()
    assert held > peak - 100, "glibc handed most of it back by itself: nothing here to measure"
    assert memory.trim_freed_memory()
    assert resident_mib() < held - 250, (peak, held, resident_mib())  # the burst was ~381 MiB
    del kept
