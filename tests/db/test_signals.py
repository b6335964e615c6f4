"""Data versions and change signals against a real server: one NOTIFY per refresh that made data live,
carrying the version and (for incremental refreshes) the keys; the version readable by applications."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from matview import client
from matview.constants import APPLICATION_NAME
from matview.plan import engine, versions
from matview.plan.observed import Connection
from matview.refresh import record_build, refresh
from tests.helpers import view


@pytest.fixture
def listener(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(f"LISTEN {versions.CHANNEL}")
        yield connection


def received(listener: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Every notification delivered so far (each was sent by a transaction that already committed)."""
    listener.execute("SELECT 1")  # a round trip: notifications that arrived are read with it
    return [json.loads(n.payload) for n in listener.notifies(timeout=0.2, stop_after=100)]


@pytest.fixture
def shop(conn: Connection) -> Connection:
    conn.execute(
        "CREATE SCHEMA shop; CREATE TABLE shop.sales (id int PRIMARY KEY, region text NOT NULL, amount int NOT NULL);"
        "INSERT INTO shop.sales SELECT g, 'r' || (g % 5), g FROM generate_series(1, 200) g"
    )
    return conn


def totals() -> Any:
    return view(
        "totals",
        "shop",
        schema="shop",
        name="totals",
        refresh={"mode": "Auto"},
        query="SELECT region, sum(amount) AS total FROM shop.sales GROUP BY region",
        indexes=[{"columns": ["region"], "unique": True}],
    )


def incremental() -> Any:
    return view(
        "inc",
        "shop",
        schema="shop",
        name="inc",
        storage="Table",
        query="SELECT region, sum(amount) AS total FROM shop.sales GROUP BY region",
        indexes=[{"columns": ["region"], "unique": True}],
        incremental={
            "keyColumns": ["region"],
            "sources": [{"table": "shop.sales", "columns": ["region"]}],
            "fullRebuildRatio": 1,
        },
    )


def test_one_signal_per_refresh_with_the_version_an_application_reads(
    shop: Connection, listener: psycopg.Connection[Any], dsn: str
) -> None:
    mv = totals()
    with psycopg.connect(dsn, autocommit=True, application_name=APPLICATION_NAME) as app:
        assert client.version(app, ("shop", "totals")) == 0
        engine.apply(shop, mv)
        record_build(shop, mv)
        [created] = received(listener)
        assert created == {"relation": "shop.totals", "version": 1, "mode": "Create", "keysChanged": None, "keys": None}
        assert client.version(app, ("shop", "totals")) == 1
        for expected, mode in enumerate(("Concurrent", "Swap", "Full"), start=2):
            result = refresh(shop, mv, mode)
            assert result.result == "success" and result.data_version == expected, result
            [signal] = received(listener)
            assert (signal["version"], signal["mode"], signal["keys"]) == (expected, mode, None)
            assert client.version(app, ("shop", "totals")) == expected
        assert engine.apply(shop, mv).changed is False
        assert received(listener) == [], "an apply that changes nothing says nothing"
        with app.transaction():  # inside an application's transaction too, and for a view never built
            assert client.version(app, ("shop", "nothing")) == 0
            assert client.version(app, ("nowhere", "nothing")) == 0
            app.execute("SELECT 1")


def test_an_incremental_refresh_names_the_keys_it_recomputed_and_a_skip_says_nothing(
    shop: Connection, listener: psycopg.Connection[Any]
) -> None:
    mv = incremental()
    engine.apply(shop, mv)
    record_build(shop, mv)
    received(listener)
    shop.execute("UPDATE shop.sales SET amount = amount + 1 WHERE id IN (1, 2, 6)")  # regions r1, r2 (r1 twice)
    result = refresh(shop, mv)
    assert result.mode == "Incremental" and result.keys_applied == 2, result
    [signal] = received(listener)
    assert signal["mode"] == "Incremental" and signal["keysChanged"] == 2
    assert sorted(signal["keys"]) == [["r1"], ["r2"]]
    change = client.signals.parse(json.dumps(signal))
    assert change is not None and sorted(change.keys or ()) == [("r1",), ("r2",)]
    skipped = refresh(shop, mv)
    assert skipped.result == "skipped", skipped
    assert received(listener) == []


def test_many_changed_keys_are_announced_as_everything(shop: Connection, listener: psycopg.Connection[Any]) -> None:
    mv = view(
        "inc",
        "shop",
        schema="shop",
        name="byid",
        storage="Table",
        query="SELECT id, amount FROM shop.sales",
        indexes=[{"columns": ["id"], "unique": True}],
        incremental={
            "keyColumns": ["id"],
            "sources": [{"table": "shop.sales", "columns": ["id"]}],
            "fullRebuildRatio": 1,
        },
    )
    engine.apply(shop, mv)
    record_build(shop, mv)
    received(listener)
    shop.execute(f"UPDATE shop.sales SET amount = amount + 1 WHERE id <= {versions.MAX_NOTIFIED_KEYS + 1}")
    result = refresh(shop, mv)
    assert result.mode == "Incremental", result
    [signal] = received(listener)
    assert signal["keysChanged"] == versions.MAX_NOTIFIED_KEYS + 1 and signal["keys"] is None


def test_the_client_and_the_engine_name_the_same_table_and_channel() -> None:
    assert (client.signals.CHANNEL, client.signals.VERSIONS_TABLE) == (versions.CHANNEL, versions.VERSIONS_TABLE)
