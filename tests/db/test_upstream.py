"""What a Table view's query reads, resolved against the real catalog (plan/upstream.resolution): a
resolution is remembered, and used again only while the catalog still says what it was made of. A view
redefined by hand, a name shadowed in an earlier schema of spec.searchPath, a table renamed or dropped:
the next refresh resolves again and an incremental refresh acts on what the catalog says now."""

from __future__ import annotations

from pathlib import Path

import pytest

from matview.api.spec import MaterializedView
from matview.plan import upstream
from matview.plan.observed import Connection
from matview.refresh import apply_and_record, refresh
from tests.helpers import RoundTrips, view

pytestmark = pytest.mark.db

SCHEMA = """
CREATE SCHEMA early; CREATE SCHEMA late;
CREATE TABLE late.events (id int PRIMARY KEY, account int NOT NULL, amount int NOT NULL);
INSERT INTO late.events SELECT g, g % 10, g FROM generate_series(1, 100) g;
CREATE VIEW late.totals AS SELECT account, sum(amount) AS total FROM late.events GROUP BY account;
"""


def totals_view() -> MaterializedView:
    return view(
        "totals",
        schema="late",
        name="totals_mv",
        storage="Table",
        query="SELECT account, total FROM totals",
        searchPath=["early", "late"],
        indexes=[{"columns": ["account"], "unique": True}],
        incremental={"keyColumns": ["account"], "sources": [{"table": "late.events", "columns": ["account"]}]},
    )


@pytest.fixture
def totals(conn: Connection) -> Connection:
    conn.execute(SCHEMA)
    return conn


def stored(conn: Connection, account: int) -> int | None:
    row = conn.execute("SELECT total FROM late.totals_mv WHERE account = %s", (account,)).fetchone()
    return int(row[0]) if row else None


def test_a_resolution_is_used_again_while_nothing_it_was_made_of_changed(totals: Connection) -> None:
    mv = totals_view()
    first = upstream.resolution(totals, mv)
    assert upstream.resolution(totals, mv) is first
    assert first.relations[(None, "totals")].definition is not None
    assert set(first.oids) == {("late", "totals"), ("late", "events")}


@pytest.mark.parametrize(
    "change",
    [
        # The definition the key filter inlines is not the one the catalog holds any more.
        "CREATE OR REPLACE VIEW late.totals AS "
        "SELECT account, sum(amount) * 2 AS total FROM late.events GROUP BY account",
        # The query's unqualified name now finds a relation in an earlier schema of spec.searchPath.
        "CREATE VIEW early.totals AS SELECT account, sum(amount) * 3 AS total FROM late.events GROUP BY account",
    ],
)
def test_a_change_by_hand_to_what_the_query_reads_is_what_the_next_refresh_acts_on(
    totals: Connection, change: str
) -> None:
    mv = totals_view()
    apply_and_record(totals, mv)
    refresh(totals, mv, "Incremental")
    remembered = upstream.resolution(totals, mv)
    totals.execute(change)
    totals.execute("UPDATE late.events SET amount = amount + 1 WHERE id = 3")
    result = refresh(totals, mv, "Incremental")
    assert (result.result, result.keys_applied) == ("success", 1), result
    totals.execute("SET search_path = early, late")
    try:
        computed = totals.execute("SELECT total FROM totals WHERE account = 3").fetchone()
    finally:
        totals.execute("RESET search_path")
    assert computed is not None and stored(totals, 3) == computed[0]
    assert upstream.resolution(totals, mv) is not remembered


def test_a_renamed_table_is_resolved_again(totals: Connection) -> None:
    mv = totals_view()
    remembered = upstream.resolution(totals, mv)
    totals.execute("ALTER TABLE late.events RENAME TO happenings")
    now = upstream.resolution(totals, mv)
    assert now is not remembered and set(now.oids) == {("late", "totals"), ("late", "happenings")}


def test_a_warm_incremental_refresh_reads_its_table_facts_in_the_proofs_round_trip(
    totals: Connection, tmp_path: Path
) -> None:
    """The fingerprints of what the query reads, the pending changes and the row estimate ride in the batch
    that proves the remembered resolution: five round trips in all (the lock with the inspection; the proof
    with the table's facts; the refresh; its closing; the changes it left), 17 at 9cebc33."""
    mv = totals_view()
    apply_and_record(totals, mv)
    for amount in range(3):  # warm: the resolution remembered, the statements prepared
        totals.execute("UPDATE late.events SET amount = amount + %s WHERE id = 3", (amount,))
        assert refresh(totals, mv, "Incremental").result == "success"
    totals.execute("UPDATE late.events SET amount = amount + 1 WHERE id = 4")
    with RoundTrips(totals, tmp_path / "trace") as trips:
        result = refresh(totals, mv, "Incremental")
    assert (result.result, result.keys_applied) == ("success", 1), result
    assert trips.count() == 5


def test_a_cold_resolution_reads_the_catalog_a_level_of_views_at_a_time(conn: Connection, tmp_path: Path) -> None:
    """A process that has not resolved the query yet (``matview refresh``, the operator's first refresh of a view)
    looks up every name of a level in one statement and reads every view definition among them in one round
    trip: here the query's two names, then the two views its view reads. One by one this was 16 round trips."""
    conn.execute(SCHEMA)
    conn.execute(
        "CREATE VIEW late.small AS SELECT account, amount FROM late.events WHERE amount < 50;"
        "CREATE VIEW late.large AS SELECT account, amount FROM late.events WHERE amount >= 50;"
        "CREATE VIEW late.paired AS SELECT s.account, s.amount + l.amount AS total "
        "FROM late.small s JOIN late.large l USING (account)"
    )
    mv = view(
        "paired",
        schema="late",
        name="paired_mv",
        storage="Table",
        query="SELECT b.account, b.total, e.amount FROM paired b JOIN events e USING (account)",
        searchPath=["late"],
        indexes=[{"columns": ["account"], "unique": False}],
        incremental={"keyColumns": ["account"], "sources": [{"table": "late.events", "columns": ["account"]}]},
    )
    with RoundTrips(conn, tmp_path / "trace") as trips:
        resolved = upstream.resolve_again(conn, mv)
    assert set(resolved.oids) == {("late", name) for name in ("paired", "events", "small", "large")}
    assert resolved.relations[(None, "paired")].definition is not None
    assert resolved.relations[("late", "small")].relkind == "v"
    # BEGIN, the pinned search_path, then per level of views its names and its definitions (2 levels), COMMIT
    assert trips.count() == 7
    assert upstream.resolution(conn, mv) is resolved  # remembered, and proved current as it stands
