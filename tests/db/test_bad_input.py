"""Injection attempts in every string field: refused with the field named, or stored verbatim as a name.

Each case runs the whole path a user runs (YAML → validation → plan → apply) against a database
holding a sentinel table; afterwards the sentinel must keep every row and, for refused input, no
relation may have appeared or disappeared.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from matview import load_documents
from matview.errors import MatviewError, SpecError
from matview.plan import engine
from matview.plan.observed import Connection
from tests.db.catalog_helpers import is_matview, relations
from tests.helpers import document, to_yaml

SENTINEL_ROWS = 100
DROP = '"; DROP TABLE public.sentinel; --'
DROP_PLAIN = "; DROP TABLE public.sentinel; --"


@pytest.fixture
def db(conn: Connection) -> Iterator[Connection]:
    conn.execute(
        "CREATE TABLE public.sentinel (id int PRIMARY KEY);"
        f"INSERT INTO public.sentinel SELECT generate_series(1, {SENTINEL_ROWS});"
        "CREATE TABLE public.base (id int PRIMARY KEY, tag text);"
        "INSERT INTO public.base SELECT g, 't' || g FROM generate_series(1, 10) g;"
        "CREATE ROLE app_injection_test"
    )
    yield conn
    conn.execute("DROP OWNED BY app_injection_test; DROP ROLE app_injection_test")


def good(**changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "query": "SELECT id, tag FROM public.base",
        "indexes": [{"columns": ["id"], "unique": True}],
        "supportingIndexes": [{"table": "public.base", "columns": ["tag"]}],
        "grants": [{"role": "app_injection_test", "privileges": ["SELECT"]}],
    }
    spec.update(changes)
    return document("inj", "default", **spec)


def sentinel_intact(conn: Connection) -> bool:
    row = conn.execute("SELECT count(*) FROM public.sentinel").fetchone()
    return row == (SENTINEL_ROWS,)


REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("schema", good(schema="public" + DROP), "spec.schema"),
    ("query: second statement", good(query="SELECT id, tag FROM public.base" + DROP_PLAIN), "spec.query"),
    ("query: DML", good(query="DELETE FROM public.sentinel"), "spec.query"),
    (
        "query: writable CTE",
        good(query="WITH d AS (DELETE FROM public.sentinel RETURNING id) SELECT * FROM d"),
        "spec.query",
    ),
    ("query: SELECT INTO", good(query="SELECT * INTO public.stolen FROM public.sentinel"), "spec.query"),
    ("query: DDL", good(query="DROP TABLE public.sentinel"), "spec.query"),
    ("query: locking", good(query="SELECT * FROM public.sentinel FOR UPDATE"), "spec.query"),
    ("columns", good(indexes=[{"columns": ["id" + DROP]}]), "spec.indexes[0].columns[0]"),
    ("where", good(indexes=[{"columns": ["id"], "where": "true)" + DROP_PLAIN}]), "spec.indexes[0].where"),
    (
        "where: subquery",
        good(indexes=[{"columns": ["id"], "where": "id IN (SELECT id FROM public.sentinel)"}]),
        "spec.indexes[0].where",
    ),
    ("method", good(indexes=[{"columns": ["id"], "method": "btree" + DROP_PLAIN}]), "spec.indexes[0].method"),
    (
        "table",
        good(supportingIndexes=[{"table": "public.base" + DROP_PLAIN, "columns": ["tag"]}]),
        "spec.supportingIndexes[0].table",
    ),
    (
        "supporting columns",
        good(supportingIndexes=[{"table": "public.base", "columns": ["tag" + DROP]}]),
        "spec.supportingIndexes[0].columns[0]",
    ),
    (
        "supporting where",
        good(supportingIndexes=[{"table": "public.base", "columns": ["tag"], "where": "1=1" + DROP_PLAIN}]),
        "spec.supportingIndexes[0].where",
    ),
    ("role", good(grants=[{"role": "app_injection_test" + DROP}]), "spec.grants[0].role"),
    (
        "privileges",
        good(grants=[{"role": "app_injection_test", "privileges": ["SELECT" + DROP_PLAIN]}]),
        "spec.grants[0].privileges[0]",
    ),
    ("timeout", good(refresh={"timeout": "5m'; DROP TABLE public.sentinel; --"}), "spec.refresh.timeout"),
    ("schedule", good(refresh={"schedule": "0 * * * *" + DROP_PLAIN}), "spec.refresh.schedule"),
]


@pytest.mark.parametrize(("case", "doc", "field"), REFUSED, ids=[c[0] for c in REFUSED])
def test_injection_is_refused_naming_the_field(db: Connection, case: str, doc: dict[str, Any], field: str) -> None:
    before = relations(db)
    with pytest.raises(SpecError) as caught:
        for view in load_documents(to_yaml(doc)):
            engine.apply(db, view)
    assert field in {e.path for e in caught.value.errors}, caught.value.errors
    assert sentinel_intact(db)
    assert relations(db) == before


STORED_VERBATIM: list[tuple[str, dict[str, Any]]] = [
    ("view name", good(name="inj" + DROP)),
    ("index name", good(indexes=[{"columns": ["id"], "unique": True, "name": "idx" + DROP}])),
    (
        "supporting index name",
        good(supportingIndexes=[{"table": "public.base", "columns": ["tag"], "name": "sup" + DROP}]),
    ),
]


@pytest.mark.parametrize(("case", "doc"), STORED_VERBATIM, ids=[c[0] for c in STORED_VERBATIM])
def test_names_are_identifiers_never_sql(db: Connection, case: str, doc: dict[str, Any]) -> None:
    view = load_documents(to_yaml(doc))[0]
    engine.apply(db, view)
    assert sentinel_intact(db)
    names = {name for _, name, _ in relations(db)}
    wanted = (
        doc["spec"].get("name")
        or doc["spec"]["indexes"][0].get("name")
        or doc["spec"]["supportingIndexes"][0].get("name")
    )
    assert wanted in names
    assert engine.plan(db, view).empty
    assert is_matview(db, "public", view.name)


def test_a_database_error_mid_apply_changes_nothing(db: Connection) -> None:
    doc = good(query="SELECT id, tag, 1 / (id - id) AS boom FROM public.base")  # division by zero when run
    before = relations(db)
    with pytest.raises(MatviewError, match="division by zero"):
        engine.apply(db, load_documents(to_yaml(doc))[0])
    assert relations(db) == before
    assert sentinel_intact(db)
