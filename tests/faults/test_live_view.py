"""The live view (spec.incremental.liveView) while its refresh is killed: readers keep reading, and every
read equals the query in the reader's own snapshot (issues #20, #21).

A session holds a lock that the incremental refresh's write needs, so the refresh is caught while it
waits to write; then either its backend is terminated or the whole `matview
run` is SIGKILLed and started again. A reader compares the live view with a full recompute of the query
in one statement every 20 ms, and a writer adds rows all along (so keys are always pending). Counted:
reads that differed, reader errors, rows lost once recovered, failures reported against injected.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from tests.faults.harness import Reader, Scenario, spec
from tests.faults.test_standalone import RECOVERY_BOUND, World, failures_reach, verdict

LIVE_QUERY = "SELECT kind, count(*) AS n, sum(amount) AS total FROM app.events GROUP BY kind"
DIFFERENCES = f"""
WITH l AS MATERIALIZED (SELECT kind, n, total FROM app.totals_live),
     q AS MATERIALIZED ({LIVE_QUERY})
SELECT (SELECT count(*) FROM (SELECT * FROM l EXCEPT ALL SELECT * FROM q) a)
     + (SELECT count(*) FROM (SELECT * FROM q EXCEPT ALL SELECT * FROM l) b)
"""

pytestmark = pytest.mark.timeout(240)


def live_spec() -> dict[str, Any]:
    document = spec(mode="Incremental", query=LIVE_QUERY)
    document["spec"].pop("indexes")  # a Table's key is incremental.keyColumns
    document["spec"]["storage"] = "Table"
    document["spec"]["incremental"] = {
        "keyColumns": ["kind"],
        "sources": [{"table": "app.events", "columns": ["kind"]}],
        "liveView": True,
        "fullRebuildRatio": 1,  # stay incremental however many keys change
    }
    # A long lock timeout: the refresh waits on the test's lock until the test kills it.
    document["spec"]["refresh"]["lockTimeout"] = "60s"
    return document


@dataclass
class LiveReader(Reader):
    """Compares the live view with the query, in one statement (one snapshot), every 20 ms."""

    mismatched: list[int] = field(default_factory=list)

    def read(self, conn: psycopg.Connection[Any]) -> None:
        row = conn.execute(DIFFERENCES).fetchone()
        if row is not None and row[0]:
            self.mismatched.append(int(row[0]))


class Writer:
    """Adds rows every 100 ms, so that the live view always has keys pending."""

    def __init__(self, w: Scenario) -> None:
        self.w = w
        self.batches = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psycopg.Error):
                self.w.add_rows(10)
                self.batches += 1
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)


def blocked_refresh(w: Scenario) -> int | None:
    """The pid of the engine's session waiting for the test's lock, if one is."""
    with w.admin() as conn:
        row = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'matview-operator' "
            "AND wait_event_type = 'Lock' AND datname = current_database()"
        ).fetchone()
    return int(row[0]) if row else None


@pytest.mark.parametrize("kill", ["backend terminated", "runner SIGKILLed"])
def test_the_live_view_stays_exact_while_its_refresh_is_killed_mid_step(world: World, kill: str) -> None:
    w = world(f"live view, refresh killed ({kill})")
    w.write_spec(live_spec())
    w.start_runner()
    w.wait(w.fresh, "the first build", 60)
    reader = LiveReader(w.server.dsn(), w.server_up).start()
    writer = Writer(w)
    try:
        with w.admin() as holder:
            holder.execute("BEGIN")
            holder.execute("LOCK TABLE app.totals IN EXCLUSIVE MODE")  # readers (ACCESS SHARE) still read
            pid: dict[str, int] = {}

            def caught() -> bool:
                found = blocked_refresh(w)
                if found is not None:
                    pid["refresh"] = found
                return found is not None

            w.wait(caught, "an incremental refresh waiting on the lock, mid-step", 60)
            if kill == "backend terminated":
                holder.execute("SELECT pg_terminate_backend(%s)", (pid["refresh"],))
                w.injected = 1
                w.wait(failures_reach(w, 1), "the runner to count the refresh that was killed", 30)
            else:
                w.kill_runner(w.runners[-1][0])
            holder.execute("ROLLBACK")
        if kill == "runner SIGKILLed":
            w.start_runner()
        reads_before = reader.reads
        # Also until the totals the verdict asks for are there: a kill caught early left too few reads before it.
        w.wait(
            lambda: reader.reads >= max(reads_before + 20, 51) and writer.batches > 10,
            "the reader and the writer to go on after the kill",
            30,
        )
        writer.stop()  # recovery is judged on a source that stands still
        w.recover(RECOVERY_BOUND)
    finally:
        writer.stop()
        reader.stop()
    row = w.report(
        reads=reader.reads,
        reader_errors=len(reader.errors),
        live_mismatches=len(reader.mismatched),
        write_batches=writer.batches,
    )
    assert reader.mismatched == [], f"reads of the live view that differed from the query: {reader.mismatched[:10]}"
    assert reader.errors == [], reader.errors[:5]
    assert reader.reads > 50 and writer.batches > 10
    verdict(w, row, injected_failures=kill == "backend terminated")
