"""The PostgreSQL a benchmark runs on: the one given by --dsn, or a private one tuned for bulk work."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from matview.embedded.localpg import LocalServer

BENCH_SETTINGS = {
    "shared_buffers": "1GB",
    "work_mem": "64MB",
    "maintenance_work_mem": "512MB",
    "max_wal_size": "8GB",
    "fsync": "off",
    "synchronous_commit": "off",
}


#: A server that commits as production does: every commit waits for its WAL to reach the disk.
DURABLE_SETTINGS = {key: value for key, value in BENCH_SETTINGS.items() if key not in ("fsync", "synchronous_commit")}


@contextmanager
def bench_database(dsn: str | None, durable: bool = False, logical: bool = False) -> Iterator[str]:
    """Yield dsn, or start (and afterwards remove) a private server in a temporary directory (logical:
    with wal_level = logical, for incremental.capture: LogicalDecoding)."""
    if dsn is not None:
        yield dsn
        return
    settings = DURABLE_SETTINGS if durable else BENCH_SETTINGS
    if logical:
        settings = {**settings, "wal_level": "logical"}
    server = LocalServer(Path(tempfile.mkdtemp(prefix="matview-bench-")) / "data", settings=settings)
    server.start()
    try:
        yield server.dsn()
    finally:
        server.remove()
