"""The schema of the operators a type compares with, as keys (equality) and page orders (less-than) ask it."""

from __future__ import annotations

import pytest
from psycopg import sql

from matview import comparisons
from matview.plan import engine


def _schemas(
    conn: engine.Connection, column_types: dict[str, str], comparison: comparisons.Comparison
) -> dict[str, str]:
    """Each column's answer, asked of the table's attributes as pages ask it (the column's type oid)."""
    columns = ", ".join(f"{name} {type_}" for name, type_ in column_types.items())
    conn.execute(f"CREATE TABLE app.typed ({columns})")
    query = sql.SQL(
        "SELECT a.attname::text, {schema} FROM pg_catalog.pg_attribute a "
        "WHERE a.attrelid = 'app.typed'::regclass AND a.attnum > 0 AND NOT a.attisdropped"
    ).format(schema=comparisons.operator_schema(sql.SQL("a.atttypid"), comparison))
    return {str(name): str(schema) if schema is not None else "(none)" for name, schema in conn.execute(query)}


@pytest.mark.parametrize("comparison", list(comparisons.Comparison))
def test_built_in_and_derived_types_compare_with_pg_catalogs_operators_and_an_extensions_type_with_its_own(
    conn: engine.Connection, comparison: comparisons.Comparison
) -> None:
    conn.execute("CREATE SCHEMA app; CREATE EXTENSION IF NOT EXISTS citext SCHEMA public")
    conn.execute("CREATE TYPE app.mood AS ENUM ('low', 'high'); CREATE DOMAIN app.code AS varchar(8)")
    conn.execute("CREATE DOMAIN app.email AS public.citext")
    found = _schemas(
        conn,
        {
            "i": "int",
            "v": "varchar(10)",  # no operators of its own: compares as text, through a binary-coercible cast
            "t": "text",
            "ts": "timestamptz",
            "a": "int[]",  # the generic anyarray class
            "mood": "app.mood",  # the generic anyenum class
            "r": "int4range",
            "code": "app.code",  # a domain over varchar
            "ci": "public.citext",
            "email": "app.email",  # a domain over citext: its base type's class
            "p": "point",  # no btree class at all
        },
        comparison,
    )
    assert found == {
        "i": "pg_catalog",
        "v": "pg_catalog",
        "t": "pg_catalog",
        "ts": "pg_catalog",
        "a": "pg_catalog",
        "mood": "pg_catalog",
        "r": "pg_catalog",
        "code": "pg_catalog",
        "ci": "public",
        "email": "public",
        "p": "(none)",
    }
