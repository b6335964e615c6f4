"""Read-only catalog queries the DB tests use to check what really exists."""

from __future__ import annotations

from matview.plan.executor import LOCK_TABLE
from matview.plan.observed import Connection
from matview.plan.versions import VERSIONS_TABLE

SYSTEM = "('pg_catalog', 'information_schema', 'pg_toast')"


def relations(conn: Connection) -> set[tuple[str, str, str]]:
    """(schema, name, relkind) of every user relation, indexes included, but not the schema's lock and data
    versions tables (and their keys), which the first lock of any view in the schema creates for all of them."""
    rows = conn.execute(
        "SELECT n.nspname, c.relname, c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        f"WHERE n.nspname NOT IN {SYSTEM} AND n.nspname NOT LIKE 'pg_temp%%' AND n.nspname NOT LIKE 'pg_toast%%' "
        "AND c.relname NOT IN (%s, %s, %s, %s)",
        (LOCK_TABLE, LOCK_TABLE + "_pkey", VERSIONS_TABLE, VERSIONS_TABLE + "_pkey"),
    ).fetchall()
    return {(str(a), str(b), str(c)) for a, b, c in rows}


def index_names(conn: Connection, schema: str, table: str) -> set[str]:
    rows = conn.execute("SELECT indexname FROM pg_indexes WHERE schemaname = %s AND tablename = %s", (schema, table))
    return {str(r[0]) for r in rows}


def index_def(conn: Connection, schema: str, name: str) -> str:
    row = conn.execute(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND indexname = %s", (schema, name)
    ).fetchone()
    assert row is not None, f"index {schema}.{name} does not exist"
    return str(row[0])


def is_matview(conn: Connection, schema: str, name: str) -> bool:
    row = conn.execute(
        "SELECT ispopulated FROM pg_matviews WHERE schemaname = %s AND matviewname = %s", (schema, name)
    ).fetchone()
    return row is not None and bool(row[0])


def can_select(conn: Connection, role: str, schema: str, name: str) -> bool:
    row = conn.execute(
        "SELECT has_table_privilege(%s, (quote_ident(%s) || '.' || quote_ident(%s))::regclass, 'SELECT')",
        (role, schema, name),
    ).fetchone()
    return bool(row and row[0])
