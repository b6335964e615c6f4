"""Triggers against logical decoding and append-only ranges for the same incremental refresh, alternated on one
server (issue #23).

Three incremental views of the driver-matrix query watch the same sources: one captured by triggers, one by a
replication slot, and one by triggers with ops.trips and ops.payments declared append-only (their INSERTs, all
that a change here writes, are read by range; ``refresh/ranges.py``). Each round makes one change of the given
share of drivers (a trip each, a payment for a tenth) and refreshes the three views (mode Incremental), the
order rotating between rounds, so that the server's state, the change and the noise are the same for all. The
slot's drain (reading its changes into the change log before the refresh decides) is timed apart. The
operator drains on a second connection (reading a slot empties the reader's catalog caches); alternate rounds
drain on the refresh's own, as ``matview refresh`` does, and are shown apart. Run on
PostgreSQL 16 or later as well (``MATVIEW_PG_BINDIR``): from 16 a drain lets the slot's restart point follow it.
Before 16 the restart point moves only at the server's own running-transactions records (the background writer
logs one every 15 s while WAL is written), so back-to-back rounds decode again the WAL of the rounds before;
``--pause`` waits that long after each round, as refreshes a minute apart would.

    python benchmarks/capture_refresh.py [--drivers 100000] [--shares 0.001,0.01] [--rounds 15] [--pause 0]

Target (#23): logical decoding within x1.2 of triggers at 0.1 % and 1 % changed. Prints medians and
ratios; no assertions (these machines are noisy). The range drain's time is inside its refresh's.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Any

from _server import bench_database
from incremental import SOURCES, change, load_workload, matrix_document, table

from matview.api.spec import MaterializedView
from matview.api.validation import validate_document
from matview.plan import engine
from matview.refresh import apply_and_record, drain, refresh

#: Seconds each drain took, in the order they ran.
drained: list[float] = []


def timed_drain(*args: Any, **kwargs: Any) -> Any:
    started = time.perf_counter()
    try:
        return untimed_drain(*args, **kwargs)
    finally:
        drained.append(time.perf_counter() - started)


untimed_drain = drain.drain
drain.drain = timed_drain  # the refresh calls it through the module


#: The sources a change here inserts into, declared append-only by their identity columns for the third view.
APPEND_ONLY = {"ops.trips": "trip_id", "ops.payments": "payment_id"}


def captured_view(capture: str, name: str, append_only: bool = False) -> MaterializedView:
    document = matrix_document(capture=capture)
    if append_only:
        for source in document["spec"]["incremental"]["sources"]:
            if source["table"] in APPEND_ONLY:
                source["appendOnly"] = {"column": APPEND_ONLY[source["table"]]}
    document["metadata"]["name"] = name
    document["spec"]["name"] = name.replace("-", "_")
    return validate_document(document)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--drivers", type=int, default=100_000)
    parser.add_argument("--shares", default="0.001,0.01", help="shares of drivers changed")
    parser.add_argument("--rounds", type=int, default=15, help="changes per share (medians)")
    parser.add_argument("--pause", type=float, default=0, help="seconds to wait after each round")
    parser.add_argument("--dsn", help="an existing server with wal_level = logical (default: a private one)")
    args = parser.parse_args()

    with bench_database(args.dsn, logical=True) as dsn, engine.connect(dsn) as conn, engine.connect(dsn) as side:
        load_workload(conn, args.drivers, analyze=True)
        for source in SOURCES[1:]:  # public.drivers is keyed by driver_id already
            conn.execute(f"ALTER TABLE {source} REPLICA IDENTITY FULL")
        print(f"PostgreSQL {conn.info.server_version // 10000}, {args.pause:g} s between rounds")
        triggers, decoding = captured_view("Triggers", "by-triggers"), captured_view("LogicalDecoding", "by-slot")
        ranges = captured_view("Triggers", "by-ranges", append_only=True)
        for view in (triggers, decoding, ranges):
            apply_and_record(conn, view)
            refresh(conn, view)  # the ranges' first refresh rebuilds (no watermark yet) and records one
            refresh(conn, view, "Incremental")  # all start from an incremental refresh, not from their build
        rows, salt = [], 0
        for share in (float(s) for s in args.shares.split(",")):
            seconds: dict[str, list[float]] = {"Triggers": [], "LogicalDecoding": [], "AppendOnly": [], "same": []}
            drained.clear()
            keys = 0
            for round_ in range(args.rounds):
                salt += 1
                keys = change(conn, args.drivers, share, salt)
                order = [(triggers, "Triggers"), (decoding, "LogicalDecoding"), (ranges, "AppendOnly")]
                for view, label in order[round_ % 3 :] + order[: round_ % 3]:
                    # The slot's drain on a second connection, as the operator and `matview run` lend one, in
                    # alternate rounds; on the refresh's own (as `matview refresh` does) in the others.
                    lent = label == "LogicalDecoding" and round_ % 2 == 0
                    result = refresh(
                        conn, view, "Incremental", aside=(lambda: contextlib.nullcontext(side)) if lent else None
                    )
                    assert result.result == "success" and result.mode == "Incremental", result
                    seconds["same" if label == "LogicalDecoding" and not lent else label].append(
                        result.duration_seconds
                    )
                time.sleep(args.pause)
            by_triggers, by_slot, by_ranges, by_same = (
                statistics.median(seconds[c]) for c in ("Triggers", "LogicalDecoding", "AppendOnly", "same")
            )
            rows.append(
                (
                    f"{share:.1%}",
                    f"{keys:,}",
                    f"{by_triggers * 1000:.1f}",
                    f"{by_slot * 1000:.1f}",
                    f"{statistics.median(drained) * 1000:.1f}",
                    f"x{by_slot / by_triggers:.2f}",
                    f"{by_same * 1000:.1f}",
                    f"x{by_same / by_triggers:.2f}",
                    f"{by_ranges * 1000:.1f}",
                    f"x{by_ranges / by_triggers:.2f}",
                )
            )
        print()
        table(
            (
                "changed",
                "keys",
                "Triggers ms",
                "LogicalDecoding ms",
                "of which the drain ms",
                "LD / Triggers",
                "LD, drained on the refresh's connection ms",
                "/ Triggers",
                "AppendOnly ms",
                "AO / Triggers",
            ),
            rows,
        )
        engine.delete(conn, decoding)  # the slot goes with it


if __name__ == "__main__":
    main()
