"""The application fallback: the plain view until the materialized view exists and is populated."""

from __future__ import annotations

from psycopg import sql

from matview.client import RelationChooser
from matview.plan import engine
from matview.plan.observed import Connection
from tests.helpers import view


def test_view_before_the_mv_exists_while_unpopulated_and_the_mv_after(conn: Connection) -> None:
    conn.execute("CREATE SCHEMA ops; CREATE TABLE ops.t (id int PRIMARY KEY);CREATE VIEW ops.v AS SELECT id FROM ops.t")
    now = [0.0]
    chooser = RelationChooser(("ops", "mv"), ("ops", "v"), cache_seconds=30, clock=lambda: now[0])
    assert chooser.name(conn) == ("ops", "v")
    spec = view("mv", "ops", schema="ops", query="SELECT id FROM ops.v", indexes=[{"columns": ["id"], "unique": True}])
    engine.apply(conn, spec)
    assert chooser.name(conn) == ("ops", "v")  # cached for 30 s
    now[0] = 31
    assert chooser.name(conn) == ("ops", "mv")
    conn.execute("REFRESH MATERIALIZED VIEW ops.mv WITH NO DATA")
    chooser.forget()
    assert chooser.name(conn) == ("ops", "v")  # unpopulated: reading it would raise
    conn.execute("REFRESH MATERIALIZED VIEW ops.mv")
    chooser.forget()
    relation = chooser.relation(conn)
    assert conn.execute(sql.SQL("SELECT count(*) FROM {}").format(relation)).fetchone() == (0,)


def test_a_view_stored_as_a_table_is_chosen_once_it_exists(conn: Connection) -> None:
    conn.execute(
        "CREATE SCHEMA ops; CREATE TABLE ops.t (id int PRIMARY KEY); CREATE VIEW ops.v AS SELECT id FROM ops.t"
    )
    chooser = RelationChooser(("ops", "stored"), ("ops", "v"), cache_seconds=0)
    assert chooser.name(conn) == ("ops", "v")
    engine.apply(conn, view("stored", "ops", schema="ops", storage="Table", query="SELECT id FROM ops.v"))
    assert chooser.name(conn) == ("ops", "stored")
