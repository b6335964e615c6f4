"""incremental.capture: LogicalDecoding on the real server (wal_level=logical, tests/conftest.py): the
publication and the slot apply makes, keys read from the WAL, what the engine repairs by itself (TRUNCATE,
a lost slot, a tampered publication), a refresh killed between the log and the slot's advance, refusals
before anything changes, look-alike objects in the way, and removal with either deletion policy.

Every test here also runs with the hostile look-alikes of tests/hostile.py planted (the dsn fixture): the
statements the drain sends are checked not to call them."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
import pytest
from psycopg import sql

from matview.api.spec import MaterializedView
from matview.embedded.localpg import LocalServer
from matview.errors import SpecError, UnmanagedObjectError
from matview.plan import capture, decoding, engine
from matview.plan.executor import LOCK_TABLE
from matview.plan.observed import Connection
from matview.refresh import refresh
from tests.db.test_incremental import SCHEMA_SQL, SOURCES, apply, matrix_view, mismatches

#: The sources whose key (driver_id) is not their primary key: UPDATEs must log the whole old row.
NOT_KEYED_BY_DRIVER = ("ops.leads", "ops.trips", "ops.claims", "ops.payments")


def decoding_view(**overrides: Any) -> MaterializedView:
    incremental = {"keyColumns": ["driver_id"], "sources": SOURCES, "capture": "LogicalDecoding"}
    return matrix_view(incremental=incremental, **overrides)


@pytest.fixture
def matrix(conn: Connection) -> Connection:
    conn.execute(SCHEMA_SQL)
    conn.execute("SELECT ops.load_driver_matrix(300)")
    for table in NOT_KEYED_BY_DRIVER:
        conn.execute(f"ALTER TABLE {table} REPLICA IDENTITY FULL")
    conn.execute("SELECT pg_stat_force_next_flush()")
    return conn


def slot(conn: Connection, mv: MaterializedView) -> tuple[str, str] | None:
    """(confirmed_flush_lsn, wal_status) of the view's slot, None when it does not exist."""
    row = conn.execute(
        "SELECT confirmed_flush_lsn::text, wal_status FROM pg_replication_slots WHERE slot_name = %s",
        (decoding.slot_name(mv),),
    ).fetchone()
    return (str(row[0]), str(row[1])) if row else None


def published(conn: Connection, mv: MaterializedView) -> set[str]:
    rows = conn.execute(
        "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = %s",
        (decoding.publication_name(mv),),
    )
    return {str(r[0]) for r in rows}


def capture_triggers(conn: Connection, mv: MaterializedView) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgname LIKE %s", (capture.trigger_prefix(mv) + "%",)
    ).fetchone()
    return int(row[0]) if row else -1


def test_apply_publishes_the_sources_and_refreshes_apply_the_keys_read_from_the_wal(matrix: Connection) -> None:
    mv = decoding_view()
    apply(matrix, mv)
    assert published(matrix, mv) == {s["table"] for s in SOURCES}
    assert capture_triggers(matrix, mv) == 0  # writers run no trigger at all
    before = slot(matrix, mv)
    assert before is not None

    matrix.execute("UPDATE ops.leads SET driver_id = 5000 WHERE driver_id = 13")  # a key moves: both keys
    matrix.execute("INSERT INTO ops.trips (driver_id, trip_date) VALUES (7, '2026-02-01')")
    matrix.execute("DELETE FROM ops.payments WHERE driver_id = 11")
    matrix.execute("UPDATE public.drivers SET driver_name = 'x' WHERE driver_id = 3")
    assert mismatches(matrix, mv) != (0, 0)
    result = refresh(matrix, mv)
    assert result.result == "success" and result.mode == "Incremental", result
    assert result.keys_applied == 5, result  # 13, 5000, 7, 11, 3
    assert result.slot_retained_wal_bytes is not None and result.slot_retained_wal_bytes >= 0
    assert mismatches(matrix, mv) == (0, 0)
    after = slot(matrix, mv)
    assert after is not None and after[0] > before[0], (before, after)  # advanced past what it applied
    assert refresh(matrix, mv).reason == "no changes pending"  # read once: the advance forgot them


def test_a_batch_larger_than_one_fetch_is_read_in_bounded_pieces(matrix: Connection, monkeypatch: Any) -> None:
    from matview.refresh import drain

    monkeypatch.setattr(drain, "FETCH_ROWS", 7)  # many fetches, transactions split across them
    mv = decoding_view()
    apply(matrix, mv)
    matrix.execute("UPDATE ops.trips SET trip_date = trip_date + 1 WHERE driver_id % 10 = 0")
    with matrix.transaction():
        for driver in (1, 2, 3):
            matrix.execute("INSERT INTO ops.trips (driver_id, trip_date) VALUES (%s, '2026-03-01')", (driver,))
    result = refresh(matrix, mv, "Incremental")
    assert result.mode == "Incremental" and result.keys_applied == 33, result
    assert mismatches(matrix, mv) == (0, 0)


def test_a_source_whose_updates_could_lose_the_old_key_is_refused_before_any_change(matrix: Connection) -> None:
    matrix.execute("ALTER TABLE ops.trips REPLICA IDENTITY DEFAULT")  # its key is trip_id, not driver_id
    mv = decoding_view()
    with pytest.raises(SpecError) as refused:
        apply(matrix, mv)
    message = str(refused.value)
    assert "spec.incremental.sources[2].table" in message and "REPLICA IDENTITY FULL" in message, message
    assert slot(matrix, mv) is None and published(matrix, mv) == set()
    left = matrix.execute("SELECT to_regclass('ops.mx'), to_regclass('ops.mx_mv_changes')").fetchone()
    assert left == (None, None)


@pytest.mark.parametrize(
    ("sabotage", "why"),
    [
        ("TRUNCATE ops.payments", "TRUNCATE of ops.payments"),
        ("SELECT pg_drop_replication_slot('{slot}')", "is missing"),
        ("DROP PUBLICATION mx_mv_pub", "does not exist"),
        ("ALTER PUBLICATION mx_mv_pub DROP TABLE ops.trips", "publishes other tables"),
        # Still the same tables, but some writes no longer reach the slot: an UPDATE's, or those the filter drops.
        ("ALTER PUBLICATION mx_mv_pub SET (publish = 'insert')", "no longer publishes every change"),
        (
            "ALTER PUBLICATION mx_mv_pub DROP TABLE ops.trips; "
            "ALTER PUBLICATION mx_mv_pub ADD TABLE ops.trips WHERE (driver_id > 1000)",
            "no longer publishes every change",
        ),
    ],
)
def test_what_makes_the_slot_unreadable_becomes_a_full_rebuild_and_capture_goes_on(
    matrix: Connection, sabotage: str, why: str
) -> None:
    mv = decoding_view()
    apply(matrix, mv)
    matrix.execute(sabotage.format(slot=decoding.slot_name(mv)))
    matrix.execute("INSERT INTO ops.trips (driver_id, trip_date) VALUES (21, '2026-02-02')")  # maybe unseen
    result = refresh(matrix, mv)
    assert result.result == "success" and result.mode == "Swap", result
    assert why in result.reason, result.reason
    assert mismatches(matrix, mv) == (0, 0)
    assert published(matrix, mv) == {s["table"] for s in SOURCES} and slot(matrix, mv) is not None
    matrix.execute("INSERT INTO ops.trips (driver_id, trip_date) VALUES (22, '2026-02-03')")
    again = refresh(matrix, mv)
    assert again.mode == "Incremental" and again.keys_applied == 1, again
    assert mismatches(matrix, mv) == (0, 0)


def test_a_slot_invalidated_by_max_slot_wal_keep_size_rebuilds_and_says_why(matrix: Connection) -> None:
    mv = decoding_view()
    apply(matrix, mv)
    matrix.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
    matrix.execute("SELECT pg_reload_conf()")
    try:
        for _ in range(3):  # WAL beyond the keep size, then a checkpoint invalidates the slot
            matrix.execute(
                "INSERT INTO ops.trips (driver_id, trip_date) SELECT 5, '2026-02-04' FROM generate_series(1, 100)"
            )
            matrix.execute("SELECT pg_switch_wal()")
        matrix.execute("CHECKPOINT")
        state = slot(matrix, mv)
        assert state is not None and state[1] == "lost", state
    finally:
        matrix.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
        matrix.execute("SELECT pg_reload_conf()")
    result = refresh(matrix, mv)
    assert result.mode == "Swap" and "max_slot_wal_keep_size" in result.reason, result
    assert mismatches(matrix, mv) == (0, 0)
    state = slot(matrix, mv)
    assert state is not None and state[1] != "lost", state


def test_killed_between_the_log_and_the_advance_a_refresh_loses_nothing(
    matrix: Connection, dsn: str, monkeypatch: Any
) -> None:
    """The drain's connection dies exactly where the keys are committed to the log and the slot has not
    advanced: the next refresh reads the same changes again, and applying a key twice is harmless."""
    mv = decoding_view()
    apply(matrix, mv)
    matrix.execute("UPDATE ops.leads SET driver_id = 4000 WHERE driver_id = 17")
    killed = sql.SQL("SELECT pg_catalog.pg_terminate_backend(pg_catalog.pg_backend_pid()), %(slot)s, %(upto)s")
    monkeypatch.setattr(decoding, "ADVANCE_QUERY", killed)
    with engine.connect(dsn) as victim:
        result = refresh(victim, mv)
    assert result.result == "failure" and result.failure_reason == "connection", result  # reported, not hidden
    monkeypatch.undo()
    logged = matrix.execute("SELECT count(*) FROM ops.mx_mv_changes").fetchone()
    assert logged == (1,)  # the keys are in the log; the slot still holds them too
    result = refresh(matrix, mv)
    assert result.mode == "Incremental" and result.keys_applied == 2, result  # 17 and 4000, once each
    assert mismatches(matrix, mv) == (0, 0)
    assert refresh(matrix, mv).reason == "no changes pending"


@pytest.mark.parametrize("policy", ["Delete", "Retain"])
def test_delete_drops_the_slot_and_the_publication_with_either_policy(matrix: Connection, policy: str) -> None:
    mv = decoding_view(deletionPolicy=policy)
    apply(matrix, mv)
    engine.delete(matrix, mv)
    assert slot(matrix, mv) is None and published(matrix, mv) == set()
    exists = matrix.execute("SELECT to_regclass('ops.mx') IS NOT NULL").fetchone()
    assert exists == (policy == "Retain",)


def test_switching_between_triggers_and_logical_decoding_replaces_the_capture(matrix: Connection) -> None:
    triggers = matrix_view()
    apply(matrix, triggers)
    assert capture_triggers(matrix, triggers) == 4 * len(SOURCES)
    decoded = decoding_view()
    apply(matrix, decoded)
    assert capture_triggers(matrix, decoded) == 0 and slot(matrix, decoded) is not None
    functions = matrix.execute(
        "SELECT count(*) FROM pg_proc WHERE proname LIKE %s", (capture.function_prefix(decoded) + "%",)
    ).fetchone()
    assert functions == (0,)
    matrix.execute("INSERT INTO ops.trips (driver_id, trip_date) VALUES (30, '2026-02-05')")
    result = refresh(matrix, decoded)
    assert result.mode == "Swap" and "capture was installed" in result.reason, result  # the switch missed nothing
    apply(matrix, triggers)
    assert slot(matrix, triggers) is None and published(matrix, triggers) == set()
    assert capture_triggers(matrix, triggers) == 4 * len(SOURCES)
    assert mismatches(matrix, triggers) == (0, 0)


def test_a_look_alike_publication_or_slot_is_never_adopted(matrix: Connection) -> None:
    mv = decoding_view()
    mallory = sql.Identifier(f"mallory_{matrix.info.dbname}")  # roles are the cluster's: one per test database
    matrix.execute(sql.SQL("CREATE ROLE {}").format(mallory))
    matrix.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(sql.Identifier(matrix.info.dbname), mallory))
    matrix.execute("CREATE PUBLICATION mx_mv_pub FOR TABLE ops.trips")
    matrix.execute(sql.SQL("ALTER PUBLICATION mx_mv_pub OWNER TO {}").format(mallory))
    forged = decoding.marker(mv).to_comment()
    matrix.execute(sql.SQL("COMMENT ON PUBLICATION mx_mv_pub IS {}").format(sql.Literal(forged)))
    with pytest.raises(UnmanagedObjectError, match="publication mx_mv_pub"):
        apply(matrix, mv)
    assert slot(matrix, mv) is None  # refused before anything was made
    matrix.execute("DROP PUBLICATION mx_mv_pub")
    matrix.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (decoding.slot_name(mv),))
    try:
        with pytest.raises(UnmanagedObjectError, match="test_decoding"):
            apply(matrix, mv)
        assert slot(matrix, mv) is not None  # somebody's slot is left alone
    finally:
        matrix.execute("SELECT pg_drop_replication_slot(%s)", (decoding.slot_name(mv),))


def test_keys_of_every_type_the_key_can_have_reach_the_log_typed(conn: Connection) -> None:
    """pgoutput sends text; the log converts it through the key's own type (composite keys, text with
    quotes and commas, timestamps, NULLs, which force a rebuild as with triggers)."""
    conn.execute(
        "CREATE SCHEMA ops; CREATE TABLE ops.items (id int PRIMARY KEY, region text, day date, v int);"
        "ALTER TABLE ops.items REPLICA IDENTITY FULL;"
        "INSERT INTO ops.items SELECT g, 'r' || (g % 3), date '2026-01-01' + g % 5, g FROM generate_series(1, 50) g"
    )
    conn.execute("SELECT pg_stat_force_next_flush()")
    mv = view_of_items()
    apply(conn, mv)
    conn.execute("""INSERT INTO ops.items VALUES (100, 'a "quoted", {braced} region', '2026-02-01', 1)""")
    conn.execute("UPDATE ops.items SET day = day + 1 WHERE id = 7")
    result = refresh(conn, mv, "Incremental")  # 3 of 15 rows: Auto would rebuild
    assert result.mode == "Incremental" and result.keys_applied == 3, result
    assert items_mismatches(conn) == 0
    conn.execute("INSERT INTO ops.items VALUES (101, NULL, '2026-02-01', 1)")
    result = refresh(conn, mv, "Incremental")
    assert result.mode == "Swap" and "NULL" in result.reason, result
    assert items_mismatches(conn) == 0


def view_of_items() -> MaterializedView:
    from tests.helpers import view

    return view(
        "items",
        schema="ops",
        name="by_region_day",
        storage="Table",
        query="SELECT region, day, sum(v) AS total FROM ops.items GROUP BY region, day",
        incremental={
            "keyColumns": ["region", "day"],
            "sources": [{"table": "ops.items", "columns": ["region", "day"]}],
            "capture": "LogicalDecoding",
        },
        refresh={"interval": "1m"},
    )


def items_mismatches(conn: Connection) -> int:
    row = conn.execute(
        "SELECT (SELECT count(*) FROM (SELECT * FROM ops.by_region_day EXCEPT ALL "
        "SELECT region, day, sum(v) FROM ops.items GROUP BY region, day) a) + (SELECT count(*) FROM ("
        "SELECT region, day, sum(v) FROM ops.items GROUP BY region, day EXCEPT ALL SELECT * FROM ops.by_region_day) b)"
    ).fetchone()
    return int(row[0]) if row else -1


def test_writers_need_nothing_beyond_their_own_table(matrix: Connection, dsn: str) -> None:
    mv = decoding_view()
    apply(matrix, mv)
    writer = f"writer_{matrix.info.dbname}"  # roles are the cluster's: one per test database
    role = sql.Identifier(writer)
    matrix.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'w'").format(role))
    matrix.execute(sql.SQL("GRANT USAGE ON SCHEMA ops TO {}").format(role))
    matrix.execute(sql.SQL("GRANT INSERT ON ops.trips TO {}").format(role))
    writer_dsn = psycopg.conninfo.make_conninfo(dsn, user=writer, password="w")
    with psycopg.connect(writer_dsn, autocommit=True) as writer_conn:
        writer_conn.execute("INSERT INTO ops.trips (driver_id, trip_date) VALUES (9, '2026-02-01')")
    result = refresh(matrix, mv)
    assert result.mode == "Incremental" and result.keys_applied == 1, result
    assert mismatches(matrix, mv) == (0, 0)


def test_the_slot_advances_while_the_sources_are_quiet(matrix: Connection) -> None:
    """Writes to other tables fill the WAL too: every refresh lets go of what the slot held, changes or not."""
    mv = decoding_view()
    apply(matrix, mv)
    matrix.execute("CREATE TABLE public.elsewhere (v int)")
    before = slot(matrix, mv)
    for _ in range(3):
        matrix.execute("INSERT INTO public.elsewhere SELECT g FROM generate_series(1, 1000) g")
        result = refresh(matrix, mv)
        assert result.reason == "no changes pending", result
    after = slot(matrix, mv)
    assert before is not None and after is not None
    lsn = matrix.execute("SELECT %s::pg_lsn - %s::pg_lsn", (after[0], before[0])).fetchone()
    assert lsn is not None and lsn[0] > 0, (before, after)


def test_a_decoded_view_whose_search_path_lists_public_calls_no_look_alike(matrix: Connection) -> None:
    """The drain, the claim and verify of a LogicalDecoding view whose spec.searchPath lists public, where the
    suite's look-alikes are: the dsn fixture fails this test if any engine statement called one."""
    from matview.plan.executor import ExecutionSettings
    from matview.refresh import verify

    mv = decoding_view(searchPath=["public"])
    apply(matrix, mv)
    matrix.execute("UPDATE ops.leads SET driver_id = 5000 WHERE driver_id = 13")
    matrix.execute("INSERT INTO ops.trips (driver_id, trip_date) VALUES (7, '2026-02-01')")
    result = refresh(matrix, mv)
    assert (result.mode, result.keys_applied) == ("Incremental", 3), result
    assert verify.compare(matrix, mv, ExecutionSettings()).matches
    assert mismatches(matrix, mv) == (0, 0)
    engine.delete(matrix, mv)


async def test_the_operators_refresh_drains_the_slot_on_a_lent_connection_and_survives_losing_it(
    matrix: Connection, dsn: str, monkeypatch: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Reading a slot empties the reading backend's catalog caches, so the refresh lane reads the slot on a
    second pooled connection and keeps its own warm; the slot's advance runs there while the refresh runs. Then
    that connection dies in the advance, after the keys' commit: the refresh stands (the keys were applied) and
    says so in a warning, the pool replaces the connection, and the next refresh reads the same changes again
    and recomputes their keys to the same rows."""
    from matview.observe.metrics import RefreshMetrics
    from matview.refresh import drain, facts
    from matview.refresh.refresher import Refresher

    mv = decoding_view()
    apply(matrix, mv)
    drained_on: list[int] = []
    refreshed_on: list[int] = []
    original_read, original_inspected = drain._read, facts.inspected

    def spied_read(conn: Connection, *args: Any, **kwargs: Any) -> Any:
        drained_on.append(conn.info.backend_pid)
        return original_read(conn, *args, **kwargs)

    def spied_inspected(conn: Connection, *args: Any) -> Any:
        refreshed_on.append(conn.info.backend_pid)
        return original_inspected(conn, *args)

    monkeypatch.setattr(drain, "_read", spied_read)
    monkeypatch.setattr(facts, "inspected", spied_inspected)
    refresher = Refresher(RefreshMetrics())
    try:
        matrix.execute("UPDATE ops.leads SET driver_id = 5000 WHERE driver_id = 13")
        result = await refresher.refresh(dsn, mv)
        assert (result.result, result.mode, result.keys_applied) == ("success", "Incremental", 2), result
        assert len(drained_on) == len(refreshed_on) == 1 and drained_on != refreshed_on, (drained_on, refreshed_on)
        assert mismatches(matrix, mv) == (0, 0)

        matrix.execute("UPDATE ops.leads SET driver_id = 4000 WHERE driver_id = 17")
        killed = sql.SQL("SELECT pg_catalog.pg_terminate_backend(pg_catalog.pg_backend_pid()), %(slot)s, %(upto)s")
        with monkeypatch.context() as patched:
            patched.setattr(decoding, "ADVANCE_QUERY", killed)
            with caplog.at_level(logging.WARNING, logger="matview.refresh.drain"):
                lost = await refresher.refresh(dsn, mv)
        assert (lost.result, lost.mode, lost.keys_applied) == ("success", "Incremental", 2), lost  # 17, 4000
        assert any("advance" in r.getMessage() and "failed" in r.getMessage() for r in caplog.records), caplog.text
        assert mismatches(matrix, mv) == (0, 0)
        again = await refresher.refresh(dsn, mv)
        assert (again.result, again.mode, again.keys_applied) == ("success", "Incremental", 2), again  # read again
        assert mismatches(matrix, mv) == (0, 0)
        assert (await refresher.refresh(dsn, mv)).reason == "no changes pending"
    finally:
        refresher.close()


def test_the_slot_advances_on_the_lent_connection_while_the_refresh_runs(matrix: Connection, dsn: str) -> None:
    """With a lent connection the advance is sent once the keys have committed and answered at the end: the
    refresh's own statements run meanwhile. Proved by holding the advance on a lock the test keeps until the
    refresh, on its own connection, is past the drain; then the slot has advanced, and the lent connection is
    back to idle, out of its pipeline. (An advance run before the refresh goes on would wait for the lock until
    the view's timeout, and fail the drain.)"""
    import contextlib

    from matview.refresh import facts

    mv = decoding_view(refresh={"interval": "1h", "timeout": "10s"})
    apply(matrix, mv)
    held_key = 720_231
    held_advance = sql.SQL(
        "SELECT pg_catalog.pg_advisory_xact_lock({}), "
        "pg_catalog.pg_replication_slot_advance(%(slot)s::pg_catalog.name, %(upto)s::pg_catalog.pg_lsn)"
    ).format(sql.Literal(held_key))
    waiting = (
        "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock' "
        "AND query LIKE '%%pg_replication_slot_advance%%'"
    )
    seen_waiting: list[bool] = []
    with engine.connect(dsn) as lent, psycopg.connect(dsn, autocommit=True) as holder:
        original_inspected = facts.inspected

        def inspected_while_the_advance_waits(conn: Connection, *args: Any) -> Any:
            # The advance was sent before the drain returned, and waits for the lock held here until released
            # below: wait for the server to show it waiting (no bound: a count of tries would be a timeout in
            # disguise on a loaded machine; an advance run before the refresh never lets the refresh get here).
            while holder.execute(waiting, (lent.info.backend_pid,)).fetchone() != (1,):
                pass
            seen_waiting.append(True)
            holder.execute("SELECT pg_advisory_unlock(%s)", (held_key,))
            return original_inspected(conn, *args)

        before = slot(matrix, mv)
        matrix.execute("UPDATE ops.leads SET driver_id = 8000 WHERE driver_id = 29")
        holder.execute("SELECT pg_advisory_lock(%s)", (held_key,))
        with pytest.MonkeyPatch.context() as patched:
            patched.setattr(decoding, "ADVANCE_QUERY", held_advance)
            patched.setattr(facts, "inspected", inspected_while_the_advance_waits)
            result = refresh(matrix, mv, aside=lambda: contextlib.nullcontext(lent))
        assert seen_waiting == [True], "the refresh went on only after the advance had answered"
        assert (result.result, result.mode, result.keys_applied) == ("success", "Incremental", 2), result
        after = slot(matrix, mv)
        assert before is not None and after is not None and after[0] != before[0], (before, after)
        assert lent.pgconn.pipeline_status == psycopg.pq.PipelineStatus.OFF
        assert lent.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert mismatches(matrix, mv) == (0, 0)


def test_a_look_at_the_slot_that_fails_under_the_lock_leaves_the_lock_free(matrix: Connection, dsn: str) -> None:
    """The look at the slot rides in the batch that takes the view's lock, after the take: one implicit
    transaction, so when the look fails the take is rolled back with it. The refresh fails, saying why, and the
    next one is not kept out by a lock nobody releases."""
    mv = decoding_view()
    apply(matrix, mv)
    matrix.execute("UPDATE ops.leads SET driver_id = 9000 WHERE driver_id = 31")
    failing = sql.SQL("SELECT pg_catalog.pg_sleep(0), %(slot)s::text, %(publication)s::text, 1 / 0")
    with engine.connect(dsn) as refresher, pytest.MonkeyPatch.context() as patched:
        patched.setattr(decoding, "SLOT_QUERY", failing)
        failed = refresh(refresher, mv)
        assert (failed.result, failed.busy) == ("failure", False), failed
        assert "division by zero" in failed.message, failed.message
        held = matrix.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE pid = %s").format(sql.Identifier("ops", LOCK_TABLE)),
            (refresher.info.backend_pid,),
        ).fetchone()
        assert held == (0,), "the failed look left the view's lock taken"
    result = refresh(matrix, mv)
    assert (result.result, result.mode, result.keys_applied) == ("success", "Incremental", 2), result
    assert mismatches(matrix, mv) == (0, 0)


def _slot_active(conn: Connection, mv: MaterializedView) -> bool:
    row = conn.execute(
        "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (decoding.slot_name(mv),)
    ).fetchone()
    return bool(row and row[0])


def test_a_refresh_whose_slot_another_session_is_using_is_skipped_as_busy(
    matrix: Connection, dsn: str, pg_server: LocalServer
) -> None:
    """One session at a time may use a replication slot. The slot's advance runs while the refresh does
    (drain._Advance), so another process's refresh of the same view may find the slot still in use after it took
    the view's lock: the view is busy, a skip the scheduler tries again, not a failure. Held here by
    pg_recvlogical, streaming the slot (with no change to send, so it consumes nothing)."""
    import subprocess
    import time

    mv = decoding_view()
    apply(matrix, mv)
    streamer = subprocess.Popen(
        [
            str(pg_server.bindir / "pg_recvlogical"),
            *("--dbname", dsn, "--slot", decoding.slot_name(mv), "--start", "--no-loop", "--file", "-"),
            *("--option", "proto_version=1", "--option", f"publication_names={decoding.publication_name(mv)}"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while not _slot_active(matrix, mv):
            assert streamer.poll() is None, f"pg_recvlogical ended: {streamer.communicate()[1]}"
            time.sleep(0.01)
        busy = refresh(matrix, mv)
        assert (busy.result, busy.busy) == ("skipped", True), busy
        assert decoding.slot_name(mv) in busy.message and "in use" in busy.message, busy.message
    finally:
        streamer.terminate()
        streamer.wait()
    while _slot_active(matrix, mv):  # the walsender ends a moment after its client
        time.sleep(0.01)
    matrix.execute("UPDATE ops.leads SET driver_id = 7000 WHERE driver_id = 23")
    result = refresh(matrix, mv)
    assert (result.result, result.mode, result.keys_applied) == ("success", "Incremental", 2), result
    assert mismatches(matrix, mv) == (0, 0)


async def test_cancelling_a_refresh_while_its_drain_runs_on_the_lent_connection_cancels_the_drain(
    matrix: Connection, dsn: str, monkeypatch: Any
) -> None:
    """The drain runs on a lent connection while the lane's own is idle: cancelling the task (a deleted view,
    shutdown) must reach the lent one's statement too. Here the drain's write of the keys sleeps 300 s (within
    the view's 600 s timeout): without the cancel reaching it, the task would wait for it past the suite's
    timeout. Cancelled, nothing is lost: the keys are still in the slot."""
    import asyncio

    from matview.observe.metrics import RefreshMetrics
    from matview.refresh.refresher import Refresher

    mv = decoding_view(refresh={"interval": "1h", "timeout": "600s"})
    apply(matrix, mv)
    matrix.execute("UPDATE ops.leads SET driver_id = 6000 WHERE driver_id = 19")
    refresher = Refresher(RefreshMetrics())
    sleeping = (
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE state = 'active' AND query LIKE '%%pg_sleep(300)%%' AND pid <> pg_backend_pid()"
    )
    watcher = psycopg.connect(dsn, autocommit=True)  # pg_stat_activity is read once per transaction
    try:
        with monkeypatch.context() as patched:
            slow = sql.SQL("SELECT pg_catalog.pg_sleep(300), %s::pg_catalog.text")
            patched.setattr(decoding, "insert_keys_statement", lambda _view: slow)
            task = asyncio.create_task(refresher.refresh(dsn, mv))
            # Until the drain sleeps or the refresh ended without it: no count of tries (a timeout in disguise).
            while watcher.execute(sleeping).fetchone() != (1,) and not task.done():
                await asyncio.sleep(0.005)
            assert not task.done() and watcher.execute(sleeping).fetchone() == (1,), "the drain never ran"
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert watcher.execute(sleeping).fetchone() == (0,)
        # The task is cancelled at once; its lane thread still rolls back and releases the view's lock. Until it
        # has, a refresh is rightly a busy skip: wait for the lock itself to be free.
        held = sql.SQL(
            "SELECT count(*) FROM {} AS l JOIN pg_stat_activity AS a "
            "ON a.pid = l.pid AND a.backend_start = l.backend_start"
        ).format(sql.Identifier("ops", LOCK_TABLE))
        while watcher.execute(held).fetchone() != (0,):
            await asyncio.sleep(0.005)
        result = await refresher.refresh(dsn, mv)
        assert (result.result, result.keys_applied) == ("success", 2), result  # 19 and 6000: nothing lost
        assert mismatches(matrix, mv) == (0, 0)
    finally:
        watcher.close()
        refresher.close()
