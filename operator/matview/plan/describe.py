"""Learning what the user's query returns without running it: its columns and their types (by preparing
it), the declared key columns' types, and whether the key-filtered query an incremental refresh runs
compiles at all, as the view's builder would compile it."""

from __future__ import annotations

import psycopg
from psycopg import sql

from matview import comparisons
from matview.api import sqltext
from matview.api.spec import MaterializedView
from matview.errors import MatviewError
from matview.plan import capture
from matview.plan.observed import Column, Connection, KeyType
from matview.plan.session import become_query_role, pin_name_resolution
from matview.plan.upstream import resolve_relations

# A key must be comparable (btree) and hashable (the claim's aggregates); keys are compared with the operators of
# the schema its default btree equality lives in (checks refuse one that is not pg_catalog's).
_KEY_TYPES = sql.SQL("""
SELECT t.oid, pg_catalog.format_type(t.oid, NULL), k.equality IS NOT NULL AND k.hashing IS NOT NULL, k.equality
FROM pg_catalog.pg_type t
CROSS JOIN LATERAL (SELECT {equality} AS equality, {hashing} AS hashing) AS k
WHERE t.oid OPERATOR(pg_catalog.=) ANY (%s::pg_catalog.oid[])
""").format(
    equality=comparisons.operator_schema(sql.SQL("t.oid"), comparisons.Comparison.EQUAL),
    hashing=comparisons.operator_schema(sql.SQL("t.oid"), comparisons.Comparison.HASH_EQUAL),
)


def describe_query(conn: Connection, query: sqltext.CheckedSQL) -> tuple[Column, ...]:
    """The query's result columns, learned by preparing it (it is not executed)."""
    return describe_query_types(conn, query)[0]


def key_types(
    conn: Connection, keys: tuple[str, ...], columns: tuple[Column, ...], types: tuple[tuple[int, int], ...]
) -> dict[str, KeyType]:
    """What the declared key columns are, and whether the claim can compare and hash them."""
    wanted = {name: typed for (name, _), typed in zip(columns, types, strict=True) if name in keys}
    found = {
        int(oid): (str(name), bool(hashable), str(equality or ""))
        for oid, name, hashable, equality in conn.execute(_KEY_TYPES, ([oid for oid, _ in wanted.values()],))
    }
    return {name: KeyType(oid, typmod, *found.get(oid, ("?", False, ""))) for name, (oid, typmod) in wanted.items()}


def describe_query_types(
    conn: Connection, query: sqltext.CheckedSQL
) -> tuple[tuple[Column, ...], tuple[tuple[int, int], ...]]:
    """describe_query, with each column's (type oid, typmod)."""
    pgconn = conn.pgconn
    text = sqltext.embed(query).as_bytes(conn)
    result = pgconn.prepare(b"", text)
    if result.status != psycopg.pq.ExecStatus.COMMAND_OK:
        sqlstate = (result.error_field(psycopg.pq.DiagnosticField.SQLSTATE) or b"XX000").decode()
        raise psycopg.errors.lookup(sqlstate)((result.error_message or b"").decode(errors="replace").strip())
    described = pgconn.describe_prepared(b"")
    columns = []
    types = []
    for i in range(described.nfields):
        name = (described.fname(i) or b"").decode()
        row = conn.execute(sql.SQL("SELECT format_type(%s, %s)"), (described.ftype(i), described.fmod(i))).fetchone()
        columns.append((name, str(row[0]) if row else "?"))
        types.append((int(described.ftype(i)), int(described.fmod(i))))
    return tuple(columns), tuple(types)


def filtered_query_error(conn: Connection, view: MaterializedView) -> str | None:
    """Why an incremental refresh of view cannot compile its key-filtered query (None when it can)."""
    try:
        return compile_error(conn, view, resolve_relations(conn, view))
    except (psycopg.Error, MatviewError, ValueError) as exc:
        return str(exc).strip()


def compile_error(conn: Connection, view: MaterializedView, key_catalog: sqltext.KeyCatalog) -> str | None:
    """Compile the query an incremental refresh runs, as the refresh compiles it (with the changed-keys table
    it reads), and say why it fails: a query that compiles only unfiltered would fail every refresh."""
    assert view.incremental is not None
    try:
        filtered = capture.key_filtered_query(view, key_catalog).query
    except ValueError:
        return None  # the planner names what cannot be rewritten
    try:
        with conn.transaction(force_rollback=True):
            pin_name_resolution(conn, view, local=True)
            become_query_role(conn, view)
            conn.execute(
                sql.SQL("CREATE TEMPORARY TABLE {} ON COMMIT DROP AS SELECT {} FROM ({}) AS q WITH NO DATA").format(
                    sql.Identifier(sqltext.CHANGED_KEYS_TABLE[1]),
                    capture.key_list(view.incremental.key_columns, "q"),
                    sqltext.embed(view.query),
                )
            )
            describe_query(conn, filtered)
    except psycopg.Error as exc:
        return (exc.diag.message_primary or str(exc)).strip()
    return None
