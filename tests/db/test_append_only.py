"""Append-only sources (issue #23): INSERTs fire no capture, each refresh reads the new rows by range.

On the driver-matrix workload, whose trips, claims and payments take their ids from identity columns. Every
check compares the stored rows with a full recompute of the same query (tests/db/test_incremental.py's
``mismatches``); the concurrency tests count rows a refresh would have missed.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import psycopg
import pytest

from matview.errors import SpecError
from matview.plan import capture, engine
from matview.plan.observed import Connection
from matview.refresh import facts, ranges, refresh
from tests.db.test_incremental import (
    SOURCES,
    apply,
    log_rows,
    matrix,
    matrix_view,
    mismatches,
    random_writes_each_refresh_equal_to_a_full_recompute,
)

__all__ = ["matrix"]  # the fixture, imported for the tests below

APPEND_ONLY = {"ops.trips": "trip_id", "ops.claims": "claim_id", "ops.payments": "payment_id"}


def append_only_sources(tables: dict[str, str] = APPEND_ONLY) -> list[dict[str, Any]]:
    return [
        {**source, "appendOnly": {"column": tables[source["table"]]}} if source["table"] in tables else source
        for source in SOURCES
    ]


def appended_view(**incremental: Any) -> Any:
    return matrix_view(incremental={"keyColumns": ["driver_id"], "sources": append_only_sources(), **incremental})


def watermarks(conn: Connection, mv: Any) -> dict[str, int | None]:
    return facts.read_state(conn, mv).watermarks


def test_inserts_fire_no_capture_and_the_next_refresh_reads_them_by_range(matrix: Connection) -> None:
    mv = appended_view()
    apply(matrix, mv)
    triggers = {
        (str(table), str(event))
        for table, event in matrix.execute(
            "SELECT tgrelid::regclass::text, CASE WHEN tgtype & 4 <> 0 THEN 'INSERT' WHEN tgtype & 8 <> 0 "
            "THEN 'DELETE' WHEN tgtype & 16 <> 0 THEN 'UPDATE' ELSE 'TRUNCATE' END FROM pg_trigger "
            "WHERE tgname LIKE %s",
            (capture.trigger_prefix(mv) + "%",),
        )
    }
    for table in ("ops.trips", "ops.claims", "ops.payments"):
        assert (table, "INSERT") not in triggers
        assert {(table, "UPDATE"), (table, "DELETE"), (table, "TRUNCATE")} <= triggers
    assert ("ops.leads", "INSERT") in triggers  # not declared append-only: captured as ever

    first = refresh(matrix, mv)
    assert first.result == "success" and first.mode == "Swap", first
    assert ranges.NO_WATERMARK in first.reason
    marks = watermarks(matrix, mv)
    top = matrix.execute("SELECT max(trip_id) FROM ops.trips").fetchone()
    assert top is not None and marks[ranges.source_label(mv.incremental.sources[2])] == top[0]

    matrix.execute(
        "INSERT INTO ops.trips (driver_id, trip_date) SELECT 3, lead_date + 1 FROM ops.leads WHERE driver_id = 3"
    )
    matrix.execute(
        "INSERT INTO ops.payments (driver_id, milestone_value, paid_at, amount) VALUES (7, 1, '2026-02-01', 10)"
    )
    assert log_rows(matrix, mv) == 0  # the writers paid for no capture
    assert mismatches(matrix, mv) != (0, 0)

    second = refresh(matrix, mv)
    assert second.result == "success" and second.mode == "Incremental", second
    assert second.keys_applied == 2  # drivers 3 and 7
    assert mismatches(matrix, mv) == (0, 0)
    assert refresh(matrix, mv).result == "skipped"  # nothing new: the range is empty

    matrix.execute("UPDATE ops.trips SET driver_id = 11 WHERE driver_id = 12")  # still captured, both keys
    matrix.execute("DELETE FROM ops.claims WHERE driver_id = 13")
    third = refresh(matrix, mv)
    assert third.mode == "Incremental" and third.keys_applied == 3, third
    assert mismatches(matrix, mv) == (0, 0)


def test_a_refresh_that_fails_after_its_drain_keeps_the_watermark_and_loses_nothing(
    matrix: Connection, dsn: str
) -> None:
    mv = matrix_view(
        incremental={"keyColumns": ["driver_id"], "sources": append_only_sources()},
        refresh={"interval": "1m", "lockTimeout": "300ms", "timeout": "2s"},
    )
    apply(matrix, mv)
    refresh(matrix, mv)
    before = watermarks(matrix, mv)
    matrix.execute("INSERT INTO ops.trips (driver_id, trip_date) VALUES (5, '2026-03-01')")
    with psycopg.connect(dsn) as blocker:
        blocker.execute("LOCK TABLE ops.mx IN SHARE MODE")  # readers go on; the refresh cannot write the view
        failed = refresh(matrix, mv)
        assert failed.result == "failure", failed
        assert log_rows(matrix, mv) >= 1  # the range was drained into the log before the refresh failed
        blocker.rollback()
    assert watermarks(matrix, mv) == before
    done = refresh(matrix, mv)
    assert done.result == "success" and done.mode == "Incremental" and done.keys_applied == 1, done
    assert mismatches(matrix, mv) == (0, 0)


def test_rows_of_a_writer_still_in_flight_below_the_top_are_waited_for_not_lost(matrix: Connection, dsn: str) -> None:
    """A writer takes an id, a second one commits a higher id: the refresh that starts now must not advance its
    watermark past the first one's row while it can still commit."""
    mv = appended_view()
    apply(matrix, mv)
    refresh(matrix, mv)
    with psycopg.connect(dsn) as slow_writer, psycopg.connect(dsn, autocommit=True) as fast_writer:
        slow_writer.execute("INSERT INTO ops.trips (driver_id, trip_date) VALUES (21, '2026-04-01')")  # open
        fast_writer.execute("INSERT INTO ops.trips (driver_id, trip_date) VALUES (22, '2026-04-01')")
        waited: list[float] = []

        def commit_later() -> None:
            # Commit once the refresh is waiting for this writer (its drain polls pg_locks).
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with psycopg.connect(dsn, autocommit=True) as probe:
                    row = probe.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%virtualtransaction%' "
                        "AND query NOT LIKE '%pg_stat_activity%'"
                    ).fetchone()
                if row is not None and row[0]:
                    waited.append(time.monotonic())
                    break
                time.sleep(0.01)
            slow_writer.commit()

        committer = threading.Thread(target=commit_later)
        committer.start()
        result = refresh(matrix, mv)
        committer.join()
    assert result.result == "success", result
    assert waited, "the refresh never waited for the writer in flight"
    assert mismatches(matrix, mv) == (0, 0)  # driver 21's trip is in, though its id is below driver 22's


def test_a_writer_in_flight_past_the_lock_timeout_fails_the_refresh_and_loses_nothing(
    matrix: Connection, dsn: str
) -> None:
    mv = matrix_view(
        incremental={"keyColumns": ["driver_id"], "sources": append_only_sources()},
        refresh={"interval": "1m", "lockTimeout": "1s"},
    )
    apply(matrix, mv)
    refresh(matrix, mv)
    marks = watermarks(matrix, mv)
    with psycopg.connect(dsn) as slow_writer:
        slow_writer.execute("INSERT INTO ops.trips (driver_id, trip_date) VALUES (31, '2026-04-01')")
        matrix.execute("INSERT INTO ops.trips (driver_id, trip_date) VALUES (32, '2026-04-01')")
        failed = refresh(matrix, mv)
        assert failed.result == "failure", failed
        assert "still in flight" in failed.message and "ops" in failed.message, failed.message
        assert watermarks(matrix, mv) == marks
        slow_writer.commit()
    done = refresh(matrix, mv)
    assert done.result == "success" and done.mode == "Incremental", done
    assert mismatches(matrix, mv) == (0, 0)


def test_truncate_restart_identity_rebuilds_and_new_low_ids_are_read(matrix: Connection) -> None:
    mv = appended_view()
    apply(matrix, mv)
    refresh(matrix, mv)
    matrix.execute("TRUNCATE ops.payments RESTART IDENTITY")
    matrix.execute(
        "INSERT INTO ops.payments (driver_id, milestone_value, paid_at, amount) VALUES (4, 1, '2026-02-01', 5)"
    )
    rebuilt = refresh(matrix, mv)
    assert rebuilt.mode == "Swap" and "TRUNCATE" in rebuilt.reason, rebuilt
    assert mismatches(matrix, mv) == (0, 0)
    matrix.execute(
        "INSERT INTO ops.payments (driver_id, milestone_value, paid_at, amount) VALUES (9, 1, '2026-02-01', 5)"
    )
    again = refresh(matrix, mv)
    assert again.mode == "Incremental" and again.keys_applied == 1, again
    assert mismatches(matrix, mv) == (0, 0)


def test_a_largest_id_that_goes_down_rebuilds_so_rows_back_below_the_watermark_are_not_missed(
    matrix: Connection,
) -> None:
    mv = appended_view()
    apply(matrix, mv)
    refresh(matrix, mv)
    # The newest trips go, and the identity is set back: new trips take ids at or below the watermark.
    matrix.execute("DELETE FROM ops.trips WHERE trip_id > (SELECT max(trip_id) - 5 FROM ops.trips)")
    matrix.execute(
        "SELECT setval(pg_get_serial_sequence('ops.trips', 'trip_id'), (SELECT max(trip_id) FROM ops.trips))"
    )
    matrix.execute(
        "INSERT INTO ops.trips (driver_id, trip_date) SELECT 17, lead_date + 1 FROM ops.leads WHERE driver_id = 17"
    )
    result = refresh(matrix, mv)
    assert result.mode == "Swap" and "went down" in result.reason and "ops.trips" in result.reason, result
    assert mismatches(matrix, mv) == (0, 0)
    matrix.execute(
        "INSERT INTO ops.trips (driver_id, trip_date) SELECT 18, lead_date + 1 FROM ops.leads WHERE driver_id = 18"
    )
    after = refresh(matrix, mv)
    assert after.mode == "Incremental" and after.keys_applied == 1, after  # the rebuild recorded the new top
    assert mismatches(matrix, mv) == (0, 0)


def test_an_empty_append_only_source_reads_every_row_it_gets(matrix: Connection) -> None:
    matrix.execute("DELETE FROM ops.claims")
    mv = appended_view()
    apply(matrix, mv)
    refresh(matrix, mv)
    assert watermarks(matrix, mv)[ranges.source_label(mv.incremental.sources[3])] is None
    matrix.execute(
        "INSERT INTO ops.claims (driver_id, milestone_value, claimed_at, status) VALUES (6, 1, '2026-02-01', 'open')"
    )
    result = refresh(matrix, mv)
    assert result.mode == "Incremental" and result.keys_applied == 1, result
    assert mismatches(matrix, mv) == (0, 0)


def test_wrong_append_only_declarations_are_refused_before_any_change(matrix: Connection) -> None:
    cases = {
        "spec.incremental.sources[2].appendOnly.column": append_only_sources({"ops.trips": "nope"}),
    }
    matrix.execute("ALTER TABLE ops.trips ADD COLUMN label text")
    wrong_type = append_only_sources({"ops.trips": "label"})
    for field, sources in [*cases.items(), ("spec.incremental.sources[2].appendOnly.column", wrong_type)]:
        with pytest.raises(SpecError) as caught:
            engine.apply(matrix, matrix_view(incremental={"keyColumns": ["driver_id"], "sources": sources}))
        assert field in [e.path for e in caught.value.errors], (field, caught.value)
        exists = matrix.execute("SELECT to_regclass('ops.mx'), to_regclass('ops.mx_mv_changes')").fetchone()
        assert exists == (None, None)


def test_a_column_without_a_sequence_of_its_own_one_at_a_time_is_refused_before_any_change(
    matrix: Connection,
) -> None:
    """Ranges are bounded by the column's own sequence: a column with no sequence, one that shares another
    table's, or one whose sequence hands each session a cache of values is refused, naming the fix."""
    matrix.execute("""
        ALTER TABLE ops.trips ADD COLUMN plain_id bigint;
        CREATE SEQUENCE ops.shared_ids;
        ALTER TABLE ops.trips ADD COLUMN shared_id bigint DEFAULT nextval('ops.shared_ids');
        ALTER SEQUENCE ops.payments_payment_id_seq CACHE 20;
    """)
    cases = [
        ({"ops.trips": "plain_id"}, "spec.incremental.sources[2]", "owns no sequence"),
        ({"ops.trips": "shared_id"}, "spec.incremental.sources[2]", "OWNED BY ops.trips.shared_id"),
        ({"ops.payments": "payment_id"}, "spec.incremental.sources[4]", "CACHE 1"),
    ]
    for tables, where, fix in cases:
        with pytest.raises(SpecError) as caught:
            engine.apply(
                matrix, matrix_view(incremental={"keyColumns": ["driver_id"], "sources": append_only_sources(tables)})
            )
        messages = {e.path: e.message for e in caught.value.errors}
        assert fix in messages.get(f"{where}.appendOnly.column", ""), (tables, caught.value)
        exists = matrix.execute("SELECT to_regclass('ops.mx'), to_regclass('ops.mx_mv_changes')").fetchone()
        assert exists == (None, None)


def test_a_row_given_an_id_by_hand_above_the_sequence_hides_none_of_the_rows_after_it(matrix: Connection) -> None:
    """A BY DEFAULT identity takes an explicit id. Bounded by the largest id alone, one far above the sequence
    raised the watermark over every id the sequence gave next, and those rows were never read."""
    mv = appended_view()
    apply(matrix, mv)
    refresh(matrix, mv)
    matrix.execute(
        "INSERT INTO ops.trips (trip_id, driver_id, trip_date) "
        "SELECT 1000000000, 3, lead_date + 1 FROM ops.leads WHERE driver_id = 3"
    )
    first = refresh(matrix, mv)
    assert first.mode == "Incremental" and first.keys_applied == 1, first
    for driver in (4, 5):  # ids from the sequence, far below the one given by hand
        matrix.execute(
            "INSERT INTO ops.trips (driver_id, trip_date) SELECT driver_id, lead_date + 2 FROM ops.leads "
            "WHERE driver_id = %s",
            (driver,),
        )
        result = refresh(matrix, mv)
        assert result.result == "success" and result.mode == "Incremental", result
        assert mismatches(matrix, mv) == (0, 0), f"driver {driver}'s trip was never read"
    top = matrix.execute("SELECT last_value FROM ops.trips_trip_id_seq").fetchone()
    assert top is not None and watermarks(matrix, mv)[ranges.source_label(mv.incremental.sources[2])] == top[0]


def test_a_sequence_that_starts_caching_values_after_apply_makes_each_refresh_rebuild(
    matrix: Connection, dsn: str
) -> None:
    """With CACHE 20, a session inserts below an id another session committed after it took its cache: no
    watermark is safe, so each refresh rebuilds and says why, and no row is lost."""
    mv = appended_view()
    apply(matrix, mv)
    refresh(matrix, mv)
    matrix.execute("ALTER SEQUENCE ops.trips_trip_id_seq CACHE 20")
    insert = (
        "INSERT INTO ops.trips (driver_id, trip_date) SELECT driver_id, lead_date + 3 FROM ops.leads "
        "WHERE driver_id = %s"
    )
    with psycopg.connect(dsn, autocommit=True) as early, psycopg.connect(dsn, autocommit=True) as late:
        early.execute(insert, (6,))  # takes ids n+1..n+20, uses the first
        late.execute(insert, (7,))  # takes n+21..n+40
        result = refresh(matrix, mv)
        assert result.mode == "Swap" and "caches 20 values" in result.reason, result
        early.execute(insert, (8,))  # id n+2: below the largest id already read
    again = refresh(matrix, mv)
    assert again.mode == "Swap" and "caches 20 values" in again.reason, again
    assert mismatches(matrix, mv) == (0, 0)


def test_switching_a_source_to_append_only_and_back_reinstalls_capture(matrix: Connection) -> None:
    plain = matrix_view()
    apply(matrix, plain)
    appended = appended_view()
    result = apply(matrix, appended)
    assert result.changed
    insert_triggers = matrix.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgname LIKE %s AND tgtype & 4 <> 0",
        (capture.trigger_prefix(plain) + "%",),
    ).fetchone()
    assert insert_triggers == (len(SOURCES) - len(APPEND_ONLY),)
    matrix.execute("INSERT INTO ops.trips (driver_id, trip_date) VALUES (8, '2026-05-01')")
    assert refresh(matrix, appended).result == "success"
    assert mismatches(matrix, appended) == (0, 0)
    apply(matrix, plain)
    insert_triggers = matrix.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgname LIKE %s AND tgtype & 4 <> 0",
        (capture.trigger_prefix(plain) + "%",),
    ).fetchone()
    assert insert_triggers == (len(SOURCES),)


def test_random_writes_with_append_only_sources_always_equal_a_full_recompute(matrix: Connection) -> None:
    """The randomized equivalence suite (tests/db/test_incremental.py) with trips, claims and payments
    declared append-only: their INSERTs reach the view only through the ranges."""
    batches, modes = random_writes_each_refresh_equal_to_a_full_recompute(matrix, appended_view(), 20261206)
    assert modes.get("Incremental", 0) > batches // 8, modes


def test_inserts_during_refreshes_from_concurrent_writers_are_never_lost(matrix: Connection, dsn: str) -> None:
    """Four writers insert into the append-only sources while refreshes run, holding their ids while others
    commit higher ones: every row is applied by some refresh. Each transaction writes one driver that no other
    write touches, so a row a refresh skipped is never recomputed by accident later."""
    mv = appended_view()
    apply(matrix, mv)
    stop = threading.Event()
    drivers = iter(range(1, 301))
    taking = threading.Lock()
    written = [0] * 4

    def write(index: int) -> None:
        rng = random.Random(index)
        with psycopg.connect(dsn, autocommit=True) as writer:
            while not stop.is_set():
                with taking:
                    driver = next(drivers, None)
                if driver is None:
                    return
                with writer.transaction():
                    # Trips within 14 days of the driver's lead: they change the driver's milestones in the view.
                    writer.execute(
                        "INSERT INTO ops.trips (driver_id, trip_date) SELECT driver_id, lead_date + g "
                        "FROM ops.leads, generate_series(1, %s) g WHERE driver_id = %s",
                        (rng.randint(1, 6), driver),
                    )
                    writer.execute(
                        "INSERT INTO ops.payments (driver_id, milestone_value, paid_at, amount) "
                        "VALUES (%s, 1, '2026-02-01', 7)",
                        (driver,),
                    )
                    if rng.random() < 0.5:
                        time.sleep(rng.random() / 20)  # holds its ids while others commit higher ones
                written[index] += 1

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    outcomes: dict[str, int] = {}
    try:
        while any(thread.is_alive() for thread in threads):
            result = refresh(matrix, mv)
            outcomes[result.result] = outcomes.get(result.result, 0) + 1
            assert result.result in ("success", "skipped"), result
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert refresh(matrix, mv).result in ("success", "skipped")
    assert sum(written) == 300 and outcomes.get("success", 0) > 5, (written, outcomes)
    assert mismatches(matrix, mv) == (0, 0)


def test_an_append_only_view_whose_search_path_lists_public_calls_no_look_alike(matrix: Connection) -> None:
    """The range drain (the sequence, the bound and the writers in flight, the range's keys) of a view whose
    spec.searchPath lists public, where the suite's look-alikes of every function and operator the engine's
    statements name are (tests/hostile.py): the dsn fixture fails this test if any engine statement called one.
    Each drain path runs: the first (no watermark), an appended range, a sequence set back."""
    mv = matrix_view(incremental={"keyColumns": ["driver_id"], "sources": append_only_sources()}, searchPath=["public"])
    apply(matrix, mv)
    assert ranges.NO_WATERMARK in refresh(matrix, mv).reason
    matrix.execute("INSERT INTO ops.trips (driver_id, trip_date) VALUES (9, '2026-03-01')")
    appended = refresh(matrix, mv)
    assert (appended.mode, appended.keys_applied) == ("Incremental", 1), appended
    matrix.execute("SELECT setval(pg_get_serial_sequence('ops.trips', 'trip_id'), 1)")
    assert "went down" in refresh(matrix, mv).reason
    assert mismatches(matrix, mv) == (0, 0)
