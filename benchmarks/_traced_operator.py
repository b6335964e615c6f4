"""`matview operator` with tracemalloc on, for `benchmarks/scale.py --memory` (issue #24): where the memory
the operator holds was allocated, by owner.

    python benchmarks/_traced_operator.py operator --namespace scale ...   (the CLI's own arguments)

On SIGUSR2 it writes, to the file named by MATVIEW_MEMORY_REPORT, the bytes still held by each owner: a
frame of ours (matview's module) when one is on the allocation's stack, else the first library frame from
the allocation outwards (kopf's watch keeps bodies that the JSON decoder allocated: kopf's), else "imports"
for what importing modules made. Tracing costs CPU and memory of its own (reported apart): run it apart from
the figures of a normal run.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType

FRAMES = 24
#: Libraries whose frames name an allocation's owner when no frame of ours is on its stack (the first found
#: from the allocation outwards wins).
LIBRARIES = (
    "kopf",
    "kubernetes",
    "prometheus_client",
    "psycopg_pool",
    "psycopg",
    "aiohttp",
    "pglast",
    "yaml",
    "urllib3",
)


def owner(filenames: list[str]) -> str:
    """filenames: the allocation's stack, innermost first."""
    for name in filenames:
        if "/matview/" in name:
            return "matview/" + name.rsplit("/matview/", 1)[1]
    if any("importlib._bootstrap" in name for name in filenames):
        return "imports"
    for name in filenames:
        for library in LIBRARIES:
            if f"/site-packages/{library}/" in name:
                return library
    return "other: " + (filenames[0].rsplit("/", 2)[-1] if filenames else "?")


def report(_signum: int, _frame: FrameType | None) -> None:
    snapshot = tracemalloc.take_snapshot()
    owners: dict[str, int] = {}
    for statistic in snapshot.statistics("traceback"):
        who = owner([frame.filename for frame in reversed(statistic.traceback)])
        owners[who] = owners.get(who, 0) + statistic.size
    traced, peak = tracemalloc.get_traced_memory()
    document = {
        "traced_bytes": traced,
        "peak_traced_bytes": peak,
        "tracing_overhead_bytes": tracemalloc.get_tracemalloc_memory(),
        "by_owner_bytes": dict(sorted(owners.items(), key=lambda item: -item[1])),
    }
    target = Path(os.environ["MATVIEW_MEMORY_REPORT"])
    partial = target.with_suffix(".partial")
    partial.write_text(json.dumps(document, indent=1))
    partial.rename(target)  # whole or absent: the reader polls for it


def main() -> int:
    tracemalloc.start(FRAMES)
    signal.signal(signal.SIGUSR2, report)
    from matview import cli

    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
