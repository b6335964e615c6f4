"""`matview operator` that reports, on SIGUSR2, how much memory its per-view structures hold, for
`benchmarks/scale.py --memory` (issue #24).

    python benchmarks/_sized_operator.py operator --namespace scale ...   (the CLI's own arguments)

Tracing every allocation (tracemalloc with stacks deep enough to name an owner) made the operator ten times
slower: 1,000 views were not scheduled after ten minutes. So the operator runs untraced, and at the end its
structures are sized where they are: the deep size of each, walked in a fixed order so that an object two of
them share is counted once, in the first. What is left of the RSS above an idle operator is kopf's own state,
the clients' buffers, allocator fragmentation and garbage. The report goes, as JSON, to the file named by
MATVIEW_MEMORY_REPORT.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType, FunctionType, ModuleType
from typing import Any


def deep_size(roots: Iterable[Any], seen: set[int]) -> int:
    """Bytes held by roots and what they reach (containers, instance dicts and slots), not counting objects
    already in seen, nor modules, classes and functions (code, not per-view state)."""
    total = 0
    pending = list(roots)
    while pending:
        obj = pending.pop()
        if id(obj) in seen or isinstance(obj, (ModuleType, type, FunctionType)):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            pending.extend(obj.keys())
            pending.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            pending.extend(obj)
        elif not isinstance(obj, (str, bytes, int, float)):
            if hasattr(obj, "__dict__"):
                pending.append(vars(obj))
            for slot in getattr(type(obj), "__slots__", ()):
                if hasattr(obj, slot):
                    pending.append(getattr(obj, slot))
    return total


def instances(kind: str) -> list[Any]:
    return [obj for obj in gc.get_objects() if type(obj).__name__ == kind]


def report(_signum: int, _frame: FrameType | None) -> None:
    from matview.k8s import resource, watch

    feeders = instances(watch.WatchFeeder.__name__)
    schedulers = [feeder.scheduler for feeder in feeders]
    seen: set[int] = set()
    parts: list[tuple[str, Callable[[], Iterable[Any]]]] = [
        ("feeder: object copies (_bodies)", lambda: [f._bodies for f in feeders]),
        ("validated specs (k8s.resource cache)", lambda: [resource._VALIDATED]),
        ("scheduler: slots and queues", lambda: [(s._slots, s._refresh_due, s._check_due) for s in schedulers]),
        ("metrics: series and their locks", lambda: [s.refresher.metrics for s in schedulers]),
        ("connection pools", lambda: [s.refresher._pools for s in schedulers]),
    ]
    sizes = {name: deep_size(roots(), seen) for name, roots in parts}
    counts: dict[str, int] = {}
    for obj in gc.get_objects():
        counts[type(obj).__name__] = counts.get(type(obj).__name__, 0) + 1
    document = {
        "by_structure_bytes": sizes,
        "views": sum(len(f._bodies) for f in feeders),
        "gc_objects_by_type": dict(sorted(counts.items(), key=lambda item: -item[1])[:25]),
    }
    target = Path(os.environ["MATVIEW_MEMORY_REPORT"])
    partial = target.with_suffix(".partial")
    partial.write_text(json.dumps(document, indent=1))
    partial.rename(target)  # whole or absent: the reader polls for it


def main() -> int:
    signal.signal(signal.SIGUSR2, report)  # runs in the main thread, between two steps of the event loop
    from matview import cli

    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
