"""Incremental refresh against a real PostgreSQL: table storage, change capture, key-filtered recompute.

The workload is the driver-matrix example (a view over six views, 8 CTEs and a FULL OUTER JOIN): every
check compares the stored rows with a full recompute of the same query, both directions, duplicates
counted.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from matview.api.spec import MaterializedView
from matview.errors import SpecError, UnmanagedObjectError
from matview.plan import capture, engine
from matview.plan.marker import Marker
from matview.plan.observed import Connection
from matview.refresh import RefreshState, apply_and_record, facts, policy, refresh, verify
from tests.helpers import cli_on, document, to_yaml, view

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_SQL = (ROOT / "sql/examples/driver_matrix/schema.sql").read_text()
SOURCES = [
    {"table": "public.drivers", "columns": ["driver_id"]},
    {"table": "ops.leads", "columns": ["driver_id"]},
    {"table": "ops.trips", "columns": ["driver_id"]},
    {"table": "ops.claims", "columns": ["driver_id"]},
    {"table": "ops.payments", "columns": ["driver_id"]},
]


def matrix_view(**overrides: Any) -> MaterializedView:
    spec: dict[str, Any] = {
        "schema": "ops",
        "name": "mx",
        "storage": "Table",
        "query": "SELECT * FROM ops.v_payments_driver_matrix_cabinet",
        "indexes": [{"columns": ["driver_id"]}],  # not unique: random leads give a driver two rows
        "incremental": {"keyColumns": ["driver_id"], "sources": SOURCES},
        "refresh": {"interval": "1m"},
    }
    spec.update(overrides)
    return view("mx", **spec)


@pytest.fixture
def matrix(conn: Connection) -> Connection:
    conn.execute(SCHEMA_SQL)
    conn.execute("SELECT ops.load_driver_matrix(300)")
    conn.execute("SELECT pg_stat_force_next_flush()")  # write counters feed the untracked-tables fingerprint
    return conn


def apply(conn: Connection, mv: MaterializedView) -> engine.ApplyResult:
    """Apply as the CLI and the operator do: a build counts as a refresh (and as a measured full rebuild)."""
    return apply_and_record(conn, mv)


def mismatches(conn: Connection, mv: MaterializedView) -> tuple[int, int]:
    """(rows stored but not computed, rows computed but not stored), duplicates counted."""
    stored = f"SELECT * FROM {mv.schema}.{mv.name}"
    computed = mv.query.text
    extra = conn.execute(f"SELECT count(*) FROM ({stored} EXCEPT ALL {computed}) d").fetchone()
    missing = conn.execute(f"SELECT count(*) FROM ({computed} EXCEPT ALL {stored}) d").fetchone()
    assert extra is not None and missing is not None
    return int(extra[0]), int(missing[0])


def test_apply_builds_a_table_with_capture_and_a_refresh_applies_only_changed_keys(matrix: Connection) -> None:
    mv = matrix_view()
    apply(matrix, mv)
    relkind = matrix.execute("SELECT relkind FROM pg_class WHERE oid = 'ops.mx'::regclass").fetchone()
    assert relkind == ("r",)
    triggers = matrix.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgname LIKE %s", (capture.trigger_prefix(mv) + "%",)
    ).fetchone()
    assert triggers == (4 * len(SOURCES),)
    assert mismatches(matrix, mv) == (0, 0)
    assert apply(matrix, mv).changed is False  # converged: a second apply does nothing

    first = refresh(matrix, mv)
    assert first.result == "skipped" and first.reason == "no changes pending", first

    matrix.execute(
        "INSERT INTO ops.trips (driver_id, trip_date) SELECT driver_id, lead_date + 1 FROM ops.leads WHERE driver_id IN (3, 7)"  # noqa: E501
    )
    matrix.execute("UPDATE ops.claims SET status = 'rejected' WHERE driver_id = 11")
    matrix.execute("DELETE FROM ops.payments WHERE driver_id = 12")
    matrix.execute("UPDATE ops.leads SET driver_id = 5000 WHERE driver_id = 13")  # a key moves: both recorded
    assert mismatches(matrix, mv) != (0, 0)

    result = refresh(matrix, mv)
    assert result.result == "success", result
    assert result.mode == "Incremental", result
    assert result.keys_applied == 6  # 3, 7, 11, 12, and 13 moved to 5000
    assert result.staleness_seconds == 0
    assert mismatches(matrix, mv) == (0, 0)


def test_truncate_forces_a_full_rebuild_that_says_why(matrix: Connection) -> None:
    mv = matrix_view()
    apply(matrix, mv)
    matrix.execute("TRUNCATE ops.payments")
    result = refresh(matrix, mv)
    assert result.result == "success" and result.mode == "Swap", result
    assert "TRUNCATE of ops.payments" in result.reason
    assert mismatches(matrix, mv) == (0, 0)
    assert refresh(matrix, mv).reason == "no changes pending"


def test_many_changed_keys_rebuild_in_full_and_mode_incremental_does_not(matrix: Connection) -> None:
    mv = matrix_view()
    apply(matrix, mv)
    matrix.execute("UPDATE public.drivers SET driver_name = driver_name || '!' WHERE driver_id % 5 = 0")  # 20 %
    result = refresh(matrix, mv)
    assert result.mode == "Swap" and "fullRebuildRatio" in result.reason, result
    assert mismatches(matrix, mv) == (0, 0)
    forced = matrix_view(refresh={"interval": "1m", "mode": "Incremental"})
    matrix.execute("UPDATE public.drivers SET driver_name = driver_name || '?' WHERE driver_id % 5 = 0")
    result = refresh(matrix, forced)
    assert result.mode == "Incremental" and result.keys_applied == 60, result
    assert mismatches(matrix, mv) == (0, 0)


def refresh_state(conn: Connection, mv: MaterializedView) -> RefreshState:
    _, marker = facts.read_marker(conn, mv.schema, mv.name, mv.run_as_role)
    assert marker is not None
    return RefreshState.from_marker(marker.state)


def test_auto_measures_both_ways_and_then_chooses_by_the_measurements(matrix: Connection) -> None:
    mv = matrix_view()
    apply(matrix, mv)
    built = refresh_state(matrix, mv)
    assert built.durations.get("Swap", 0) > 0, built  # the build is the first full rebuild measured
    assert built.incremental_samples == ()
    for modulus in (100, 30):  # 3 keys, then 10: two sizes, so a cost per key can be told from the fixed cost
        matrix.execute(f"UPDATE public.drivers SET driver_name = driver_name || '!' WHERE driver_id % {modulus} = 0")
        result = refresh(matrix, mv)
        assert result.mode == "Incremental" and "the default fullRebuildRatio" in result.reason, result
    samples = refresh_state(matrix, mv).incremental_samples
    assert [keys for keys, _ in samples] == [3, 10] and all(seconds > 0 for _, seconds in samples), samples

    matrix.execute("UPDATE public.drivers SET driver_name = driver_name || '!' WHERE driver_id % 50 = 0")
    result = refresh(matrix, mv)
    assert "predicted incremental" in result.reason and "a full rebuild" in result.reason, result
    state = refresh_state(matrix, mv)
    model = policy.CostModel.fit(samples)
    assert model is not None
    expected = "Swap" if model.seconds(6) > built.durations["Swap"] else "Incremental"
    # The same numbers the decision had: it followed them (or re-measured the slower way, and said so).
    assert result.mode == expected or "re-measuring" in result.reason, (result, model, built.durations)
    assert mismatches(matrix, mv) == (0, 0)
    assert len(state.incremental_samples) == 2 + (result.mode == "Incremental")


def test_a_dropped_trigger_is_restored_by_apply_and_forces_a_full_rebuild(matrix: Connection) -> None:
    mv = matrix_view()
    apply(matrix, mv)
    name = capture.trigger_names(mv)["UPDATE"]
    matrix.execute(f'DROP TRIGGER "{name}" ON ops.trips')
    matrix.execute("UPDATE ops.trips SET trip_date = trip_date - 30 WHERE driver_id = 4")  # not captured
    plan = engine.plan(matrix, mv)
    assert any("ops.trips are missing" in reason for reason in plan.reasons), plan.reasons
    apply(matrix, mv)
    result = refresh(matrix, mv)
    assert result.mode == "Swap" and "capture was missing on ops.trips" in result.reason, result
    assert mismatches(matrix, mv) == (0, 0)


def capture_functions(conn: Connection, mv: MaterializedView) -> dict[str, str]:
    """Capture functions of mv's in its schema (by the shared prefix, or the legacy name) → what they insert."""
    rows = conn.execute(
        "SELECT p.proname, p.prosrc FROM pg_proc p WHERE p.pronamespace = %s::regnamespace "
        "AND (left(p.proname, length(%s)) = %s OR p.proname = %s)",
        (mv.schema, capture.function_prefix(mv), capture.function_prefix(mv), capture.legacy_function_name(mv)),
    )
    return {str(name): str(body) for name, body in rows}


def log_rows(conn: Connection, mv: MaterializedView) -> int:
    row = conn.execute(f'SELECT count(*) FROM {mv.schema}."{capture.changes_name(mv)}"').fetchone()
    assert row is not None
    return int(row[0])


def test_each_source_and_operation_has_one_branchless_function_and_no_rows_write_nothing(matrix: Connection) -> None:
    mv = matrix_view()
    apply(matrix, mv)
    found = capture_functions(matrix, mv)
    assert sorted(found) == sorted(capture.functions(mv)) and len(found) == 3 * len(SOURCES) + 1
    assert not any(word in body for body in found.values() for word in ("IF ", "DISTINCT", "UNION SELECT", "TG_OP"))
    before = log_rows(matrix, mv)
    matrix.execute("UPDATE ops.trips SET trip_date = trip_date WHERE driver_id = -1")  # no rows
    matrix.execute("DELETE FROM ops.trips WHERE driver_id = -1")
    matrix.execute("INSERT INTO ops.trips SELECT * FROM ops.trips WHERE false")
    assert log_rows(matrix, mv) == before, "a statement that touched no rows writes nothing"
    matrix.execute("UPDATE ops.trips SET trip_date = trip_date WHERE driver_id IN (5, 6)")
    keys = matrix.execute(f'SELECT driver_id FROM ops."{capture.changes_name(mv)}"').fetchall()
    assert len(keys) == before + 1 and sorted(set(keys[-1][0])) == [5, 6], keys[-1]
    result = refresh(matrix, mv)
    assert (result.mode, result.keys_applied) == ("Incremental", 2), result
    assert mismatches(matrix, mv) == (0, 0)


def test_capture_of_a_source_since_removed_and_of_the_older_format_is_dropped(matrix: Connection) -> None:
    """Functions are named by the source's place in the list: those of a removed source go, and so does the
    single branching function (and its triggers) an older operator made."""
    apply(matrix, matrix_view())
    fewer = matrix_view(incremental={"keyColumns": ["driver_id"], "sources": SOURCES[:2] + SOURCES[3:]})
    apply(matrix, fewer)
    assert sorted(capture_functions(matrix, fewer)) == sorted(capture.functions(fewer))
    # What format 5 left: one function, every trigger calling it, the log's digest of that format.
    legacy = capture.legacy_function_name(fewer)
    digest = capture.capture_digest(fewer).rsplit(".", 1)[0] + ".5"
    marker = Marker(fewer.owner, "capture", digest).to_comment()
    matrix.execute(
        f'CREATE FUNCTION ops."{legacy}"() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS '
        "'BEGIN RETURN NULL; END'"
    )
    matrix.execute(f"COMMENT ON FUNCTION ops.\"{legacy}\"() IS '{marker}'")
    for source in fewer.incremental.sources if fewer.incremental else ():
        for operation, name in capture.trigger_names(fewer).items():
            referencing = {
                "INSERT": "REFERENCING NEW TABLE AS n",
                "DELETE": "REFERENCING OLD TABLE AS o",
                "UPDATE": "REFERENCING NEW TABLE AS n OLD TABLE AS o",
                "TRUNCATE": "",
            }[operation]
            matrix.execute(f'DROP TRIGGER "{name}" ON {source.schema}.{source.table}')
            matrix.execute(
                f'CREATE TRIGGER "{name}" AFTER {operation} ON {source.schema}.{source.table} {referencing} '
                f'FOR EACH STATEMENT EXECUTE FUNCTION ops."{legacy}"()'
            )
    matrix.execute(
        f'COMMENT ON TABLE ops."{capture.changes_name(fewer)}" IS '
        f"'{Marker(fewer.owner, 'changes', digest).to_comment()}'"
    )
    assert apply(matrix, fewer).changed
    assert sorted(capture_functions(matrix, fewer)) == sorted(capture.functions(fewer)), "the legacy one is gone"
    matrix.execute("UPDATE ops.claims SET status = status WHERE driver_id = (SELECT min(driver_id) FROM ops.claims)")
    result = refresh(matrix, fewer)
    assert result.mode == "Swap" and result.result == "success", result  # the old log is not readable
    matrix.execute("UPDATE ops.claims SET status = status WHERE driver_id = (SELECT max(driver_id) FROM ops.claims)")
    result = refresh(matrix, fewer)
    assert (result.mode, result.keys_applied) == ("Incremental", 1), result
    assert mismatches(matrix, fewer) == (0, 0)


def test_writes_to_an_undeclared_table_rebuild_in_full(matrix: Connection) -> None:
    partial = [s for s in SOURCES if s["table"] != "public.drivers"]
    mv = matrix_view(incremental={"keyColumns": ["driver_id"], "sources": partial})
    apply(matrix, mv)
    matrix.execute("UPDATE public.drivers SET driver_name = 'renamed' WHERE driver_id = 2")
    matrix.execute("SELECT pg_stat_force_next_flush()")
    result = refresh(matrix, mv)
    assert result.mode == "Swap" and "not a declared source" in result.reason, result
    assert mismatches(matrix, mv) == (0, 0)


def test_wrong_declarations_are_refused_before_any_change(matrix: Connection) -> None:
    cases = {
        "spec.incremental.keyColumns[0]": {"keyColumns": ["nope"], "sources": SOURCES},
        "spec.incremental.sources[0].columns[0]": {
            "keyColumns": ["driver_id"],
            "sources": [{"table": "ops.trips", "columns": ["nope"]}],
        },
        "spec.incremental.sources[0].table": {
            "keyColumns": ["driver_id"],
            "sources": [{"table": "ops.nothing", "columns": ["driver_id"]}],
        },
    }
    matrix.execute("CREATE TABLE ops.unrelated (driver_id bigint)")
    cases["spec.incremental.sources[1].table"] = {
        "keyColumns": ["driver_id"],
        "sources": [SOURCES[0], {"table": "ops.unrelated", "columns": ["driver_id"]}],
    }
    for field, incremental in cases.items():
        with pytest.raises(SpecError) as caught:
            engine.apply(matrix, matrix_view(incremental=incremental))
        assert field in [e.path for e in caught.value.errors], (field, caught.value)
        exists = matrix.execute("SELECT to_regclass('ops.mx'), to_regclass('ops.mx_mv_changes')").fetchone()
        assert exists == (None, None)


def test_plan_shows_the_key_filtered_query(matrix: Connection) -> None:
    from matview.plan.capture import key_filtered_query
    from matview.plan.upstream import resolve_relations

    mv = matrix_view()
    result = key_filtered_query(mv, resolve_relations(matrix, mv))
    assert result.filtered == {
        ("public", "drivers"),
        ("ops", "leads"),
        ("ops", "trips"),
        ("ops", "claims"),
        ("ops", "payments"),
    }
    assert ("ops", "v_payments_driver_matrix_cabinet") in result.inlined
    assert result.query.text.count("pg_temp.matview_changed_keys") >= 5


def test_delete_removes_capture_even_when_the_data_is_retained(matrix: Connection) -> None:
    mv = matrix_view()
    apply(matrix, mv)
    engine.delete(matrix, mv)
    left = matrix.execute(
        "SELECT to_regclass('ops.mx') IS NOT NULL, to_regclass('ops.mx_mv_changes'), "
        "(SELECT count(*) FROM pg_trigger WHERE tgname LIKE %s)",
        (capture.trigger_prefix(mv) + "%",),
    ).fetchone()
    assert left == (True, None, 0)
    matrix.execute("INSERT INTO ops.trips (driver_id, trip_date) VALUES (1, '2026-01-01')")  # writers unaffected


def test_writers_need_no_privilege_on_the_change_log(matrix: Connection, dsn: str) -> None:
    mv = matrix_view()
    apply(matrix, mv)
    matrix.execute("CREATE ROLE writer LOGIN PASSWORD 'w'; GRANT USAGE ON SCHEMA ops TO writer")
    matrix.execute("GRANT INSERT, SELECT ON ops.trips TO writer")
    writer_dsn = psycopg.conninfo.make_conninfo(dsn, user="writer", password="w")
    with psycopg.connect(writer_dsn, autocommit=True) as writer:
        writer.execute("INSERT INTO ops.trips (driver_id, trip_date) VALUES (9, '2026-02-01')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            writer.execute("SELECT * FROM ops.mx_mv_changes")
    result = refresh(matrix, mv)
    assert result.mode == "Incremental" and result.keys_applied == 1, result
    assert mismatches(matrix, mv) == (0, 0)


def random_batch(conn: Connection, rng: random.Random, drivers: int, truncate: bool = True) -> str:
    """One random write to the workload's base tables; returns what it did (for the failure message).
    truncate: sometimes TRUNCATE a table (never where a concurrent reader compares snapshots: TRUNCATE is not
    MVCC-safe, so a snapshot taken before it sees the table empty)."""
    driver = rng.randint(1, drivers + 20)  # sometimes a driver that does not exist yet
    other = rng.randint(1, drivers + 20)
    day = f"2026-01-01'::date + {rng.randint(0, 320)}"
    choices = [
        (
            "insert trips",
            f"INSERT INTO ops.trips (driver_id, trip_date) SELECT {driver}, '{day} + g FROM generate_series(0, {rng.randint(0, 30)}) g",  # noqa: E501
        ),
        ("delete trips", f"DELETE FROM ops.trips WHERE driver_id = {driver} AND trip_id % {rng.randint(1, 4)} = 0"),
        ("move trips", f"UPDATE ops.trips SET driver_id = {other} WHERE driver_id = {driver} AND trip_id % 2 = 0"),
        (
            "shift trips",
            f"UPDATE ops.trips SET trip_date = trip_date + {rng.randint(-10, 10)} WHERE driver_id IN ({driver}, {other})",  # noqa: E501
        ),
        (
            "insert lead",
            f"INSERT INTO ops.leads SELECT coalesce(max(lead_id), 0) + 1, {driver}, 'web', '{day} FROM ops.leads",
        ),
        ("delete lead", f"DELETE FROM ops.leads WHERE driver_id = {driver}"),
        ("move lead", f"UPDATE ops.leads SET lead_date = '{day} WHERE driver_id = {driver}"),
        (
            "claim",
            f"INSERT INTO ops.claims (driver_id, milestone_value, claimed_at, status) VALUES ({driver}, {rng.choice([1, 5, 25])}, '{day}, '{rng.choice(['open', 'rejected'])}')",  # noqa: E501
        ),
        ("reject claims", f"UPDATE ops.claims SET status = 'rejected' WHERE driver_id = {driver}"),
        (
            "pay",
            f"INSERT INTO ops.payments (driver_id, milestone_value, paid_at, amount) VALUES ({driver}, {rng.choice([1, 5, 25])}, '{day}, {rng.randint(1, 200)})",  # noqa: E501
        ),
        ("unpay", f"DELETE FROM ops.payments WHERE driver_id = {driver}"),
        (
            "rename",
            f"UPDATE public.drivers SET driver_name = md5(random()::text) WHERE driver_id IN ({driver}, {other})",
        ),
        (
            "new driver",
            f"INSERT INTO public.drivers VALUES ({drivers + 1000 + rng.randint(0, 10**6)}, 'n', '{day}) ON CONFLICT DO NOTHING",  # noqa: E501
        ),
        (
            "bulk",
            f"UPDATE ops.trips SET trip_date = trip_date + 1 WHERE driver_id % {rng.randint(7, 40)} = {rng.randint(0, 6)}",  # noqa: E501
        ),
        ("no-op update", f"UPDATE ops.claims SET status = status WHERE driver_id = {driver}"),
    ]
    name, statement = rng.choice(choices)
    if rng.random() < 0.004 and truncate:
        name, statement = "truncate", f"TRUNCATE {rng.choice(['ops.payments', 'ops.claims'])}"
    conn.execute(statement)
    return name


def captured_by(conn: Connection, capture_method: str) -> MaterializedView:
    """The matrix view with this capture; for LogicalDecoding, sources whose primary key is not the view's key
    log their whole old row (REPLICA IDENTITY FULL), so a key that moves is seen leaving."""
    if capture_method == "LogicalDecoding":
        for table in ("ops.leads", "ops.trips", "ops.claims", "ops.payments"):
            conn.execute(f"ALTER TABLE {table} REPLICA IDENTITY FULL")
    return matrix_view(incremental={"keyColumns": ["driver_id"], "sources": SOURCES, "capture": capture_method})


def random_writes_each_refresh_equal_to_a_full_recompute(
    conn: Connection, mv: MaterializedView, default_seed: int
) -> tuple[int, dict[str, int]]:
    """Apply mv, then thousands of random INSERT/UPDATE/DELETE/TRUNCATE batches with a refresh every four; after
    every refresh, stored = computed. (batches, the modes the refreshes took)."""
    seed = int(os.environ.get("MATVIEW_EQUIVALENCE_SEED", str(default_seed)))
    batches = int(os.environ.get("MATVIEW_EQUIVALENCE_BATCHES", "2000"))
    rng = random.Random(seed)
    apply(conn, mv)
    modes: dict[str, int] = {}
    recent: list[str] = []
    for batch in range(1, batches + 1):
        recent.append(random_batch(conn, rng, 300))
        if batch % 4 and batch != batches:
            continue
        result = refresh(conn, mv)
        assert result.result in ("success", "skipped"), result
        modes[result.mode] = modes.get(result.mode, 0) + 1
        assert mismatches(conn, mv) == (0, 0), f"seed {seed}, batch {batch}, after {recent}: {result}"
        recent = []
    print("modes", modes)
    return batches, modes


@pytest.mark.parametrize("capture_method", ["Triggers", "LogicalDecoding"])
def test_random_writes_incremental_always_equals_a_full_recompute(matrix: Connection, capture_method: str) -> None:
    """Thousands of random INSERT/UPDATE/DELETE/TRUNCATE batches; after every refresh, stored = computed."""
    mv = captured_by(matrix, capture_method)
    batches, modes = random_writes_each_refresh_equal_to_a_full_recompute(matrix, mv, 20261128)
    assert modes.get("Incremental", 0) > batches // 8, modes  # mostly incremental, not a full rebuild each time
    assert modes.get("Swap", 0) >= 1, modes  # the TRUNCATEs and the bulk updates


@pytest.mark.parametrize("capture_method", ["Triggers", "LogicalDecoding"])
def test_writes_during_refreshes_are_never_lost(matrix: Connection, dsn: str, capture_method: str) -> None:
    """A writer keeps committing while refreshes run: every change is applied by some refresh."""
    mv = captured_by(matrix, capture_method)
    apply(matrix, mv)
    stop = threading.Event()
    written = [0]

    def write() -> None:
        rng = random.Random(7)
        with psycopg.connect(dsn, autocommit=True) as writer:
            while not stop.is_set():
                random_batch(writer, rng, 300)
                written[0] += 1

    thread = threading.Thread(target=write)
    thread.start()
    try:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            result = refresh(matrix, mv)
            assert result.result in ("success", "skipped"), result
    finally:
        stop.set()
        thread.join()
    refresh(matrix, mv)
    assert written[0] > 50
    assert mismatches(matrix, mv) == (0, 0)


WRONG_DECLARATION: dict[str, Any] = {
    "schema": "ops",
    "name": "totals",
    "storage": "Table",
    "query": "SELECT grp, sum(v) AS total, count(*) AS n FROM ops.items GROUP BY grp",
    # Wrong on purpose: a row's id is not the view's key (grp is), so changes land on the wrong keys.
    "incremental": {
        "keyColumns": ["grp"],
        "sources": [{"table": "ops.items", "columns": ["id"]}],
        "fullRebuildRatio": 1,
    },
}


def test_verification_catches_a_wrong_declaration_and_can_rebuild(conn: Connection, tmp_path: Path) -> None:
    conn.execute("CREATE SCHEMA ops; CREATE TABLE ops.items (id int PRIMARY KEY, grp int NOT NULL, v int NOT NULL)")
    conn.execute("INSERT INTO ops.items SELECT g, g % 10, g FROM generate_series(1, 100) g")
    conn.execute("SELECT pg_stat_force_next_flush()")
    wrong = view("totals", **WRONG_DECLARATION, refresh={"interval": "1m"})
    apply(conn, wrong)
    conn.execute("UPDATE ops.items SET v = v + 1000 WHERE id = 3")  # changes group 3; records key 3 (group 3)
    conn.execute("UPDATE ops.items SET v = v + 1000 WHERE id = 15")  # changes group 5; records key 15
    result = refresh(conn, wrong)
    assert result.mode == "Incremental" and result.verification is None  # no verifyInterval: not checked
    # Group 3 was recomputed from item 3 alone, group 5 was never touched: two rows wrong each way.
    assert mismatches(conn, wrong) == (2, 2)

    verified = verify.compare(conn, wrong, engine.settings_for(wrong))
    assert (verified.extra_rows, verified.missing_rows, verified.matches) == (2, 2, False)

    # The CLI says so, and exits 1.
    document_path = tmp_path / "wrong.yaml"
    document_path.write_text(to_yaml(document("totals", **WRONG_DECLARATION)))
    dsn = conn.info.dsn
    cli = subprocess.run(
        [sys.executable, "-m", "matview.cli", "verify", str(document_path), "--dsn", dsn],
        capture_output=True,
        text=True,
        check=False,
    )
    assert cli.returncode == 1, cli
    assert "MISMATCH: 2 row(s) stored" in cli.stdout

    # Periodic verification on a refresh: reported, and with rebuildOnMismatch repaired by a full rebuild.
    checked = view(
        "totals",
        **{**WRONG_DECLARATION, "incremental": {**WRONG_DECLARATION["incremental"], "verifyInterval": "1s"}},
        refresh={"interval": "1m"},
    )
    conn.execute("UPDATE ops.items SET v = v + 1 WHERE id = 27")
    result = refresh(conn, checked)
    assert result.verification is not None and result.verification.mismatched_rows >= 2, result
    assert result.mode == "Incremental"
    repairing = view(
        "totals",
        **{
            **WRONG_DECLARATION,
            "incremental": {**WRONG_DECLARATION["incremental"], "verifyInterval": "1s", "rebuildOnMismatch": True},
        },
        refresh={"interval": "1m"},
    )
    conn.execute("UPDATE ops.items SET v = v + 1 WHERE id = 28")
    time.sleep(1.1)
    result = refresh(conn, repairing)
    assert result.mode == "Swap" and result.fallback_from == "Incremental", result
    assert "verification found" in result.reason
    assert mismatches(conn, repairing) == (0, 0)


def test_a_null_key_forces_a_full_rebuild(conn: Connection) -> None:
    conn.execute("CREATE SCHEMA ops; CREATE TABLE ops.items (id int PRIMARY KEY, grp int, v int NOT NULL)")
    conn.execute("INSERT INTO ops.items SELECT g, g % 10, g FROM generate_series(1, 100) g")
    conn.execute("SELECT pg_stat_force_next_flush()")
    right = view(
        "totals",
        **{
            **WRONG_DECLARATION,
            "incremental": {"keyColumns": ["grp"], "sources": [{"table": "ops.items", "columns": ["grp"]}]},
        },
        refresh={"interval": "1m"},
    )
    apply(conn, right)
    conn.execute("UPDATE ops.items SET grp = NULL WHERE id = 4")
    result = refresh(conn, right)
    assert result.mode == "Swap" and "NULL" in result.reason, result
    assert mismatches(conn, right) == (0, 0)
    conn.execute("UPDATE ops.items SET v = 0 WHERE id = 5")
    result = refresh(conn, right)
    assert result.mode == "Incremental" and result.keys_applied == 1, result
    assert mismatches(conn, right) == (0, 0)


def test_storage_changes_from_materialized_view_to_table_by_a_swap_keeping_dependents(matrix: Connection) -> None:
    spec: dict[str, Any] = {
        "schema": "ops",
        "name": "mx",
        "query": "SELECT * FROM ops.v_payments_driver_matrix_cabinet",
        "indexes": [{"columns": ["driver_id"]}],
        "refresh": {"interval": "1m"},
    }
    apply(matrix, view("mx", **spec))
    matrix.execute("CREATE VIEW ops.mx_names AS SELECT driver_id, driver_name FROM ops.mx")
    table = matrix_view()
    result = apply(matrix, table)
    assert "query, searchPath, runAsRole or storage changed" in result.plan.reasons
    kinds = matrix.execute(
        "SELECT relkind FROM pg_class WHERE oid IN ('ops.mx'::regclass, 'ops.mx_names'::regclass) ORDER BY relname"
    ).fetchall()
    assert kinds == [("r",), ("v",)]
    assert mismatches(matrix, table) == (0, 0)
    matrix.execute("UPDATE public.drivers SET driver_name = 'x' WHERE driver_id = 8")
    assert refresh(matrix, table).mode == "Incremental"
    assert matrix.execute("SELECT driver_name FROM ops.mx_names WHERE driver_id = 8").fetchone() == ("x",)
    # A query change swaps the table and re-creates the dependent view.
    changed = matrix_view(query="SELECT * FROM ops.v_payments_driver_matrix_cabinet WHERE driver_id > 0")
    assert apply(matrix, changed).built
    assert matrix.execute("SELECT count(*) FROM ops.mx_names").fetchone() == (300,)
    assert mismatches(matrix, changed) == (0, 0)


def test_an_incremental_refresh_killed_mid_way_loses_nothing(matrix: Connection, dsn: str) -> None:
    mv = matrix_view()
    apply(matrix, mv)
    matrix.execute("UPDATE ops.trips SET trip_date = trip_date + 1 WHERE driver_id IN (1, 2, 3)")
    # Make the recompute of driver 4 slow (only while ops.ctl says so), to kill it in the middle.
    matrix.execute("CREATE TABLE ops.ctl (pause float NOT NULL); INSERT INTO ops.ctl VALUES (0)")
    matrix.execute(
        "CREATE FUNCTION ops.slow(bigint) RETURNS bigint LANGUAGE sql AS "
        "'SELECT $1 FROM ops.ctl, pg_sleep(CASE WHEN $1 = 4 THEN ctl.pause ELSE 0 END)'"
    )
    slow = matrix_view(query="SELECT *, ops.slow(driver_id) AS s FROM ops.v_payments_driver_matrix_cabinet")
    apply(matrix, slow)  # a query change: rebuilt in full, capture kept
    matrix.execute("UPDATE ops.claims SET status = 'rejected' WHERE driver_id IN (4, 5)")
    matrix.execute("UPDATE ops.ctl SET pause = 5")
    before = matrix.execute("SELECT count(*) FROM ops.mx").fetchone()

    def kill_soon() -> None:
        """Once the recompute runs (it sleeps 5 s on driver 4), terminate it."""
        deadline = time.monotonic() + 60
        with psycopg.connect(dsn, autocommit=True) as killer:
            while not killer.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE state = 'active' AND query LIKE '%%INSERT INTO \"ops\".\"mx\"%%' AND pid <> pg_backend_pid()"
            ).fetchall():
                assert time.monotonic() < deadline, "the recompute never ran"
                time.sleep(0.01)

    with psycopg.connect(dsn, autocommit=True) as victim:
        thread = threading.Thread(target=kill_soon)
        thread.start()
        result = refresh(victim, slow, "Incremental")
        thread.join()
    assert result.result == "failure" and result.failure_reason == "connection", result
    assert matrix.execute("SELECT count(*) FROM ops.mx").fetchone() == before  # the old rows, all of them
    matrix.execute("UPDATE ops.ctl SET pause = 0")
    again = refresh(matrix, slow)
    assert again.result == "success" and again.mode == "Incremental" and again.keys_applied == 2, again
    assert mismatches(matrix, slow) == (0, 0)


def test_the_incremental_example_applies_refreshes_and_verifies_through_the_cli(matrix: Connection) -> None:
    matview = cli_on(str(ROOT / "examples/driver-matrix-incremental.yaml"), matrix.info.dsn)

    plan = matview("plan")
    assert plan.returncode == 0, plan.stderr
    assert "CREATE TRIGGER" in plan.stdout and "CREATE TABLE" in plan.stdout
    assert "an incremental refresh recomputes the changed keys with" in plan.stdout
    assert plan.stdout.count("pg_temp.matview_changed_keys") >= 5  # every source, through the views
    assert 'CREATE VIEW "ops"."driver_matrix_inc_live"' in plan.stdout, "the live view's SQL is in the plan"
    applied = matview("apply")
    assert applied.returncode == 0, applied.stderr
    matrix.execute("UPDATE ops.trips SET trip_date = trip_date WHERE driver_id IN (10, 20)")
    live = "SELECT * FROM ops.driver_matrix_inc_live"
    query = "SELECT * FROM ops.v_payments_driver_matrix_cabinet"
    both_ways = matrix.execute(
        f"SELECT (SELECT count(*) FROM ({live} EXCEPT ALL {query}) a), "
        f"(SELECT count(*) FROM ({query} EXCEPT ALL {live}) b)"
    ).fetchone()
    assert both_ways == (0, 0), "the example's live view equals its query before any refresh"
    refreshed = matview("refresh", "--json")
    assert refreshed.returncode == 0, refreshed.stderr
    assert '"mode": "Incremental"' in refreshed.stdout and '"keysApplied": 2' in refreshed.stdout, refreshed.stdout
    verified = matview("verify")
    assert verified.returncode == 0 and "matches a full recompute" in verified.stdout, verified.stdout


def test_objects_that_hold_capture_names_and_are_not_ours_stop_apply_and_survive_delete(matrix: Connection) -> None:
    mv = matrix_view()
    planted = capture.function_name(mv, 0, "INSERT")
    matrix.execute(f"CREATE FUNCTION ops.\"{planted}\"() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END'")
    with pytest.raises(UnmanagedObjectError, match="not managed by matview-operator"):
        engine.apply(matrix, mv)
    assert matrix.execute("SELECT to_regclass('ops.mx'), to_regclass('ops.mx_mv_changes')").fetchone() == (None, None)
    engine.delete(matrix, matrix_view(deletionPolicy="Delete"))
    assert matrix.execute(
        f"SELECT to_regprocedure('ops.\"{capture.function_name(mv, 0, 'INSERT')}\"()') IS NOT NULL"
    ).fetchone() == (True,)
    matrix.execute(f'DROP FUNCTION ops."{planted}"()')
    matrix.execute("CREATE TABLE ops.mx_mv_changes (x int)")
    with pytest.raises(UnmanagedObjectError):
        engine.apply(matrix, mv)
    engine.delete(matrix, matrix_view(deletionPolicy="Delete"))
    assert matrix.execute("SELECT to_regclass('ops.mx_mv_changes') IS NOT NULL").fetchone() == (True,)


def test_a_writer_cannot_make_the_capture_function_run_its_code(matrix: Connection, dsn: str) -> None:
    """The capture function runs with its owner's rights on every write: a writer who shadows the functions
    and operators it uses, on its own search_path, must not get them called."""
    mv = matrix_view()
    apply(matrix, mv)
    matrix.execute("CREATE ROLE mallory LOGIN PASSWORD 'm'; GRANT USAGE ON SCHEMA ops TO mallory")
    matrix.execute("GRANT INSERT, UPDATE, SELECT ON ops.trips TO mallory; GRANT USAGE ON SCHEMA public TO mallory")
    matrix.execute("CREATE SCHEMA evil AUTHORIZATION mallory")
    mallory_dsn = psycopg.conninfo.make_conninfo(dsn, user="mallory", password="m")
    with psycopg.connect(mallory_dsn, autocommit=True) as mallory:
        mallory.execute(
            """
            CREATE TABLE evil.calls (who text, what text);
            GRANT INSERT ON evil.calls TO PUBLIC;
            CREATE FUNCTION evil.note(what text) RETURNS void LANGUAGE sql
                AS 'INSERT INTO evil.calls VALUES (current_user, what)';
            CREATE FUNCTION evil.gt(bigint, integer) RETURNS boolean LANGUAGE sql
                AS 'SELECT evil.note(''>''); SELECT true';
            CREATE OPERATOR evil.> (LEFTARG = bigint, RIGHTARG = integer, FUNCTION = evil.gt);
            CREATE FUNCTION evil.eq(name, text) RETURNS boolean LANGUAGE sql
                AS 'SELECT evil.note(''=''); SELECT true';
            CREATE OPERATOR evil.= (LEFTARG = name, RIGHTARG = text, FUNCTION = evil.eq);
            CREATE FUNCTION evil.eq(text, text) RETURNS boolean LANGUAGE sql
                AS 'SELECT evil.note(''=t''); SELECT true';
            CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.eq);
            CREATE FUNCTION evil.count() RETURNS bigint LANGUAGE sql AS 'SELECT evil.note(''count''); SELECT 1::bigint';
            CREATE FUNCTION evil.step(bigint[], bigint) RETURNS bigint[] LANGUAGE sql
                AS 'SELECT evil.note(''array_agg''); SELECT $1 || $2';
            CREATE AGGREGATE evil.array_agg(bigint) (SFUNC = evil.step, STYPE = bigint[]);
            CREATE FUNCTION evil.format(text, VARIADIC text[]) RETURNS text LANGUAGE sql
                AS 'SELECT evil.note(''format''); SELECT ''x''';
            """
        )
        mallory.execute("SET search_path = evil, pg_catalog")
        mallory.execute("INSERT INTO ops.trips (driver_id, trip_date) VALUES (17, '2026-02-01')")
        mallory.execute("UPDATE ops.trips SET trip_date = trip_date WHERE driver_id = 18")
    calls = matrix.execute("SELECT who, what FROM evil.calls").fetchall()
    assert calls == [], calls
    result = refresh(matrix, mv)
    assert result.mode == "Incremental" and result.keys_applied == 2, result
    assert mismatches(matrix, mv) == (0, 0)
