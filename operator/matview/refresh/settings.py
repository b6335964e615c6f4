"""The limits of the refresher and the rules of the one scheduler, apart from the machinery that applies them:
the CLI reads these defaults to build its options without importing threads, pools and metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from matview.plan import engine
from matview.refresh import schedule

Lane = Literal["refresh", "apply", "check"]
"""Work of one kind, with its own threads, connection pool and per-database cap (see ``refresher``)."""
LANES: tuple[Lane, ...] = ("refresh", "apply", "check")

SWITCH_INTERVAL_SECONDS = 0.001
"""How long a thread busy in Python may keep the interpreter's lock from one that waits for it (CPython's
``sys.setswitchinterval``; its default is 5 ms), in the long-running processes (``matview run`` and the
operator). A refresh gives up the lock at each of its round trips to the database and waits to take it back
when the answer comes; at 5 ms, while kopf handled watch events or a /metrics scrape formatted its series, a
15 ms refresh took 100 ms and more although the process used well under one core
(``benchmarks/gil_handoff.py`` measures it, per interval)."""

MALLOC_ARENAS = 2
"""glibc's malloc arenas in the long-running processes (``mallopt(M_ARENA_MAX)``; glibc's default is eight per
core). Each thread that allocates while another holds an arena gets one of its own, and memory freed in one is
not reused by the others: the lanes' and the Kubernetes client's threads each parse and drop objects, and the
operator's RSS grew far beyond what its structures hold. An explicit ``MALLOC_ARENA_MAX`` in the environment
wins."""


@dataclass(frozen=True)
class RunnerSettings:
    """Limits of the refresher and the rules of the one scheduler (the operator and ``matview run`` alike)."""

    max_concurrent_per_database: int = 4
    """The most refreshes that may run at once against one database (its refresh lane's ceiling)."""
    base_concurrent_per_database: int = 2
    """The refresh slots a database starts with (fewer when the ceiling is lower). While a due refresh has
    waited ``lane_grow_after_seconds`` for a slot (counted from when it was due: the scheduler keeps overdue
    refreshes in its due-queue), the lane grows by one, up to the ceiling; after
    ``lane_shrink_after_seconds`` with nobody waiting it gives one back (see ``slots``)."""
    lane_grow_after_seconds: float = 1.0
    lane_shrink_after_seconds: float = 60.0
    retry_seconds: float = 30.0
    """First delay before retrying a failed refresh; doubled per failure, capped by the view's period."""
    busy_retry_seconds: float = schedule.BUSY_RETRY_SECONDS
    """How soon a view that another process held (an apply, a refresh, a drift check) is looked at again."""
    reload_seconds: float = 2.0
    """How often ``matview run`` looks for changed files."""
    drift_check_seconds: float = 300.0
    """How often each view is re-applied to repair hand-made changes (a dropped capture trigger,
    a replaced capture function, a dropped index); spread evenly over the period."""
    max_concurrent_drift_checks: int = 4
    """Applies and drift checks the scheduler runs at once in the whole process (each database also caps its
    applies, below)."""
    apply_policy: engine.ApplyPolicy = field(default_factory=engine.ApplyPolicy)
    """What applies made by this runner accept (superuser runAsRole)."""
    max_concurrent_applies_per_database: int = 4
    """Applies (create, edit, delete) that may run at once against one database."""
    max_concurrent_checks_per_database: int = 1
    """Drift checks that may run at once against one database, in a lane of their own: a creation never waits
    behind drift checks, and they never take a refresh lane."""
    refresh_threads: int = 32
    """Worker threads for refreshes, shared by all databases (each database is capped as above)."""
    apply_threads: int = 8
    """Worker threads for applies."""
