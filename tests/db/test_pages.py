"""Keyset pages (matview.client.page) against a real server: every row once, forward and backward, while
refreshes run; cursors refused after a query change; orders no unique index covers refused with the fix.

The client runs under the application's own search_path, so these tests read with a default-search_path
session that says it is the engine's (application_name): the suite's hostile look-alikes in ``public``
(tests/hostile.py) fail the test if the client's SQL ever calls one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from matview import client
from matview.constants import APPLICATION_NAME
from matview.plan import engine
from matview.plan.observed import Connection
from matview.refresh import refresh
from tests.helpers import view

ROWS = 2_000


@pytest.fixture
def reader(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(dsn, autocommit=True, application_name=APPLICATION_NAME) as connection:
        yield connection


def totals(**spec: Any) -> Any:
    body: dict[str, Any] = {
        "schema": "shop",
        "name": "totals",
        "query": "SELECT id, region, amount FROM shop.sales",
        "indexes": [{"columns": ["id"], "unique": True}, {"columns": ["region", "id"], "unique": True}],
        "refresh": {"mode": "Concurrent"},
    }
    body.update(spec)
    return view("totals", "shop", **body)


@pytest.fixture
def shop(conn: Connection) -> Connection:
    conn.execute(
        "CREATE SCHEMA shop; CREATE TABLE shop.sales (id int PRIMARY KEY, region text NOT NULL, amount int NOT NULL);"
        f"INSERT INTO shop.sales SELECT g, 'r' || (g % 7), g FROM generate_series(1, {ROWS}) g"
    )
    engine.apply(conn, totals())
    return conn


def walk(
    reader: psycopg.Connection[Any],
    limit: int,
    relation: tuple[str, str] = ("shop", "totals"),
    **options: Any,
) -> tuple[list[Any], list[Any]]:
    """Every first column forward page by page, then backward from the end."""
    forward: list[Any] = []
    cursor = None
    last: client.Page | None = None
    while True:
        current = client.page(reader, relation, limit=limit, after=cursor, **options)
        forward += [row[0] for row in current.rows]
        last = current if current.rows else last
        if current.next is None:
            break
        cursor = current.next
    backward: list[int] = []
    assert last is not None
    backward = [row[0] for row in last.rows]
    cursor = last.previous
    while cursor is not None:
        current = client.page(reader, relation, limit=limit, before=cursor, **options)
        backward = [row[0] for row in current.rows] + backward
        cursor = current.previous
    return forward, backward


def test_walking_every_page_forward_and_backward_returns_each_row_once_during_refreshes(
    shop: Connection, reader: psycopg.Connection[Any], dsn: str
) -> None:
    stop = threading.Event()
    refreshed = []

    def refresher() -> None:
        with engine.connect(dsn) as own:
            while not stop.is_set():
                own.execute("UPDATE shop.sales SET amount = amount + 1 WHERE id % 13 = 0")
                refreshed.append(refresh(own, totals(), "Concurrent").result)

    thread = threading.Thread(target=refresher)
    thread.start()
    try:
        for order, limit in ((["id"], 97), (["region", "id"], 250), (["-id"], 333)):
            forward, backward = walk(reader, limit, order=order)
            assert sorted(forward) == list(range(1, ROWS + 1)), order
            assert backward == forward, order
    finally:
        stop.set()
        thread.join()
    assert refreshed and set(refreshed) == {"success"}, refreshed


def test_pages_with_an_equal_filter_and_the_order_they_claim(shop: Connection, reader: psycopg.Connection[Any]) -> None:
    first = client.page(reader, ("shop", "totals"), order=["id"], limit=5, equal={"region": "r3"})
    assert [row[0] for row in first.rows] == [3, 10, 17, 24, 31] and first.previous is None
    second = client.page(reader, ("shop", "totals"), order=["id"], limit=5, equal={"region": "r3"}, after=first.next)
    assert [row[0] for row in second.rows] == [38, 45, 52, 59, 66]
    back = client.page(
        reader, ("shop", "totals"), order=["id"], limit=5, equal={"region": "r3"}, before=second.previous
    )
    assert back.rows == first.rows
    assert first.columns == ("id", "region", "amount")


def test_a_cursor_made_before_the_query_changed_is_refused(shop: Connection, reader: psycopg.Connection[Any]) -> None:
    first = client.page(reader, ("shop", "totals"), order=["id"], limit=10)
    engine.apply(shop, totals(query="SELECT id, region, amount * 2 AS amount FROM shop.sales"))
    with pytest.raises(client.CursorError, match="another definition"):
        client.page(reader, ("shop", "totals"), order=["id"], limit=10, after=first.next)
    with pytest.raises(client.CursorError, match="another order"):
        client.page(reader, ("shop", "totals"), order=["region", "id"], limit=10, after=first.next)
    for garbled in ("", "!!!", "e30", "x" * 100_000):
        with pytest.raises(client.CursorError):
            client.page(reader, ("shop", "totals"), order=["id"], limit=10, after=garbled)


def test_an_order_no_unique_index_covers_is_refused_naming_the_index_to_declare(
    shop: Connection, reader: psycopg.Connection[Any]
) -> None:
    with pytest.raises(client.OrderError) as caught:
        client.page(reader, ("shop", "totals"), order=["amount"], limit=10)
    message = str(caught.value)
    assert "not covered by a unique index" in message and "(id; region, id)" in message
    assert "`indexes: [{columns: [amount], unique: true}]`" in message
    with pytest.raises(client.OrderError, match="no column 'nope'"):
        client.page(reader, ("shop", "totals"), order=["nope"], limit=10)
    with pytest.raises(client.OrderError, match="same way"):
        client.page(reader, ("shop", "totals"), order=["region", "-id"], limit=10)
    with pytest.raises(client.OrderError, match="limit"):
        client.page(reader, ("shop", "totals"), order=["id"], limit=0)


def test_pages_through_the_fallback_chooser_and_on_a_plain_view(
    shop: Connection, reader: psycopg.Connection[Any]
) -> None:
    shop.execute("CREATE VIEW shop.v_totals AS SELECT id, region, amount FROM shop.sales")
    chooser = client.RelationChooser(("shop", "totals"), ("shop", "v_totals"))
    stored = client.page(reader, chooser, order=["id"], limit=3)
    assert [row[0] for row in stored.rows] == [1, 2, 3]
    missing = client.RelationChooser(("shop", "nothing"), ("shop", "v_totals"))
    with pytest.raises(client.OrderError, match="not covered by a unique index"):
        client.page(reader, missing, order=["id"], limit=3)
    plain = client.page(reader, missing, order=["id"], limit=3, unique_by=["id"])
    assert plain.rows == stored.rows
    with pytest.raises(client.CursorError, match="another definition"):
        client.page(reader, missing, order=["id"], limit=3, unique_by=["id"], after=stored.next)


def test_a_null_in_an_order_column_is_an_error_not_a_lost_row(
    shop: Connection, reader: psycopg.Connection[Any]
) -> None:
    shop.execute("CREATE TABLE shop.odd (id int UNIQUE, v int)")
    shop.execute("INSERT INTO shop.odd VALUES (1, 1), (NULL, 2)")
    first = client.page(reader, ("shop", "odd"), order=["id"], limit=1)
    assert first.rows == [(1, 1)]
    with pytest.raises(client.OrderError, match="holds NULL"):
        client.page(reader, ("shop", "odd"), order=["id"], limit=1, after=first.next)


def test_a_citext_order_pages_as_its_own_order_sorts_and_a_mixed_one_is_refused(
    conn: Connection, reader: psycopg.Connection[Any]
) -> None:
    """ORDER BY sorts citext with citext's operators (case ignored); pg_catalog's ``>`` compares it as text,
    so in a database with the C collation the page after 'a@x' left out 'B@x' and 'D@x'. Pages compare each
    type with its own operator class's operators, named with their schema (never the application's
    search_path); an order mixing types whose operators live in different schemas is refused."""
    conn.execute("CREATE EXTENSION IF NOT EXISTS citext SCHEMA public")
    conn.execute(
        'CREATE TABLE public.people (email public.citext PRIMARY KEY COLLATE "C", n int NOT NULL UNIQUE);'
        "INSERT INTO public.people VALUES ('a@x', 1), ('B@x', 2), ('c@x', 3), ('D@x', 4), ('e@x', 5)"
    )
    ordered = [str(row[0]) for row in conn.execute("SELECT email FROM public.people ORDER BY email")]
    assert ordered == ["a@x", "B@x", "c@x", "D@x", "e@x"]
    forward, backward = walk(reader, 1, ("public", "people"), order=["email"])
    assert forward == ordered and backward == ordered
    descending, _ = walk(reader, 2, ("public", "people"), order=["email DESC"])
    assert descending == ordered[::-1]
    same, _ = walk(reader, 2, ("public", "people"), order=["email"], equal={"email": "C@X"})
    assert same == ["c@x"]  # citext's equality, as the unique index has it
    with pytest.raises(client.OrderError, match=r"email \(public\), n \(pg_catalog\)"):
        client.page(reader, ("public", "people"), order=["email", "n"])
