"""The live view of an incremental view: answers with every committed write, without waiting for a refresh.

``<name>_live`` (opt-in: ``spec.incremental.liveView``) returns, inside the reader's own snapshot:

- the stored rows whose key has no pending change in the change log, plus
- for each pending key, the user's query key-filtered exactly as an incremental refresh filters it;
- or, while a full rebuild is pending (a TRUNCATE, a repaired capture, a NULL key), the whole query: slow
  but correct, which is the original fallback from the view to its query, made automatic.

An incremental refresh claims keys from the log and rewrites their rows in one transaction, so any
snapshot sees a key either pending (and recomputed here) or applied (and stored): never both, never
neither. Writes to tables the declaration does not list are not in the log: they show after the next
refresh, as in the stored table.

Why a function computes the pending keys (``<name>_live_rows``, one key per call, or every row when
called with NULLs) instead of the query standing in the view's text: a read of one key or one page must
cost about what the same read of the table costs. Inlined, the query made every read plan it (a
statement over the driver-matrix view plans in ~12 ms) and its estimate (the whole query) made
PostgreSQL JIT-compile every read (~200 ms); and a key predicate on the view never reached the pending
keys through the query's aggregates. Behind the function, the view's key columns come from the pending
keys themselves, so ``WHERE key = $1`` and ``key > $1`` narrow the pending keys before any is computed,
and PL/pgSQL keeps the function's plan for the session (a generic plan from the first call: the key is
an index probe whatever its value, and planning per call would cost more than the call). The function is
STABLE (it reads the caller's snapshot), SECURITY DEFINER as the view's builder with the pinned
search_path (it reads what the builder reads, like the view), EXECUTE only for the roles granted on the
view. Its rows have the shape of ``<name>_live_shape``, an empty table made from the query, so that it
depends on nothing a swap replaces.

This module is the pure half: names, markers and statements; the planner decides when they run.
"""

from __future__ import annotations

import hashlib
import json

from psycopg import sql

from matview import comparisons
from matview.api import sqltext
from matview.api.spec import MaterializedView, truncate_utf8
from matview.constants import MAX_IDENTIFIER_BYTES
from matview.plan import capture
from matview.plan.marker import Marker
from matview.plan.statements import grantee

_VIEW_SUFFIX, _ROWS_SUFFIX, _SHAPE_SUFFIX = "_live", "_live_rows", "_live_shape"
#: Changes when the shape of the statements below changes, so that apply re-creates older live views (4: the
#: log's key arrays read with pg_catalog's unnest and array_position, whatever spec.searchPath lists first; 5:
#: keys compared with pg_catalog's equality, comparisons.KEY_EQUALS).
LIVE_FORMAT_VERSION = "5"


def _named(view: MaterializedView, suffix: str) -> str:
    return truncate_utf8(view.name, MAX_IDENTIFIER_BYTES - len(suffix)) + suffix


def name(view: MaterializedView) -> str:
    return _named(view, _VIEW_SUFFIX)


def function_name(view: MaterializedView) -> str:
    return _named(view, _ROWS_SUFFIX)


def shape_name(view: MaterializedView) -> str:
    return _named(view, _SHAPE_SUFFIX)


def identifier(view: MaterializedView) -> sql.Identifier:
    return sql.Identifier(view.schema, name(view))


def function_identifier(view: MaterializedView) -> sql.Identifier:
    return sql.Identifier(view.schema, function_name(view))


def shape_identifier(view: MaterializedView) -> sql.Identifier:
    return sql.Identifier(view.schema, shape_name(view))


def wanted(view: MaterializedView) -> bool:
    return view.incremental is not None and view.incremental.live_view


def digest(view: MaterializedView) -> str:
    """What the live view was made from: the query and declaration, the capture format, the grants (the
    function's EXECUTE follows them), this module's format."""
    grants = json.dumps(sorted((grant.role, sorted(grant.privileges)) for grant in view.grants))
    granted = hashlib.sha256(grants.encode()).hexdigest()[:8]
    return f"{view.definition_digest}.{capture.capture_digest(view)}.{granted}.{LIVE_FORMAT_VERSION}"


def marker(view: MaterializedView) -> Marker:
    """Ours, made from this definition; it names the stored table, whose unique indexes keyset pages use."""
    return Marker(view.owner, "live", digest(view), {"table": view.name})


def part_marker(view: MaterializedView, part: str) -> Marker:
    """The marker of the live view's function ("rows") and row shape ("shape")."""
    return Marker(view.owner, "live", digest(view), {"part": part})


def _pending(view: MaterializedView) -> sql.Composed:
    """The keys with a change in the log, as a subquery (not a CTE, so that a key predicate reaches it)."""
    return sql.SQL("(SELECT DISTINCT {})").format(capture.claimable_keys(view))


def _rebuild_due(view: MaterializedView) -> sql.Composed:
    """True while the log holds a change only a full rebuild applies: a constant per statement."""
    return sql.SQL("(SELECT EXISTS (SELECT FROM {} AS l WHERE NOT ({})))").format(
        capture.changes_id(view), capture.claimable(view)
    )


#: $1..$8 (spec.incremental.keyColumns holds at most 8): the function's key parameters, as constants.
_PARAMETERS = (
    sql.SQL("$1"),
    sql.SQL("$2"),
    sql.SQL("$3"),
    sql.SQL("$4"),
    sql.SQL("$5"),
    sql.SQL("$6"),
    sql.SQL("$7"),
    sql.SQL("$8"),
)


def function_body(view: MaterializedView, key_catalog: sqltext.KeyCatalog) -> sql.Composed:
    """PL/pgSQL: the query for the one key given, or the whole query when the key is NULL. Columns win over
    the function's own names (FOUND), so a query reading a column called that still reads the column."""
    assert view.incremental is not None
    keys = view.incremental.key_columns
    filtered = capture.key_filtered_query(view, key_catalog, keys_table=None).query
    parameters = sql.SQL(", ").join(_PARAMETERS[: len(keys)])
    return sql.SQL(
        "#variable_conflict use_column\n"
        "BEGIN\n"
        "IF $1 IS NULL THEN\n"
        "RETURN QUERY SELECT * FROM ({query}) AS q;\n"
        "ELSE\n"
        "RETURN QUERY SELECT * FROM ({filtered}) AS q WHERE ({keys}) {equals} ({parameters});\n"
        "END IF;\n"
        "END"
    ).format(
        query=sqltext.embed(view.query),
        filtered=sqltext.embed(filtered),
        keys=capture.key_list(keys, "q"),
        equals=comparisons.KEY_EQUALS,
        parameters=parameters,
    )


def query(view: MaterializedView, columns: tuple[str, ...]) -> sql.Composed:
    """The live view's SELECT; columns are the query's (and the table's), in order."""
    assert view.incremental is not None
    keys = view.incremental.key_columns
    pending, rebuild = _pending(view), _rebuild_due(view)
    computed = sql.SQL(", ").join(sql.Identifier("p" if column in keys else "q", column) for column in columns)
    nulls = sql.SQL(", ").join(sql.SQL("NULL") for _ in keys)
    return sql.SQL(
        "SELECT t.* FROM {table} AS t\n"
        "WHERE NOT {rebuild}\n"
        "  AND NOT EXISTS (SELECT FROM {pending} AS p WHERE ROW({pending_keys}) {equals} ROW({table_keys}))\n"
        "UNION ALL\n"
        "SELECT {computed} FROM {pending} AS p CROSS JOIN LATERAL {function}({pending_keys}) AS q\n"
        "WHERE NOT {rebuild}\n"
        "UNION ALL\n"
        "SELECT q.* FROM {function}({nulls}) AS q WHERE {rebuild}"
    ).format(
        table=sql.Identifier(view.schema, view.name),
        rebuild=rebuild,
        pending=pending,
        pending_keys=capture.key_list(keys, "p"),
        equals=comparisons.KEY_EQUALS,
        table_keys=capture.key_list(keys, "t"),
        computed=computed,
        function=function_identifier(view),
        nulls=nulls,
    )


def create_statements(
    view: MaterializedView,
    key_catalog: sqltext.KeyCatalog,
    columns: tuple[str, ...],
) -> list[sql.Composed]:
    """(Re)create the row shape, the function and the view, with their markers; the function runs for the
    roles granted on the view and nobody else. The view's own grants follow (the planner's, like the
    table's). Runs as the view's builder."""
    assert view.incremental is not None
    keys = view.incremental.key_columns
    shape, function, target = shape_identifier(view), function_identifier(view), identifier(view)
    arguments = sql.SQL(", ").join(sql.SQL("{}.{}%TYPE").format(shape, sql.Identifier(k)) for k in keys)
    # The body goes in as a string literal (quoted by psycopg, so nothing in the query can end it early).
    body = sql.Literal(function_body(view, key_catalog).as_string(None))
    readers = [grant.role for grant in view.grants if "SELECT" in grant.privileges]
    return [
        *drop_statements(view, if_exists=True),
        sql.SQL("CREATE TABLE {} AS SELECT * FROM ({}) AS q WITH NO DATA").format(shape, sqltext.embed(view.query)),
        sql.SQL("COMMENT ON TABLE {} IS {}").format(shape, sql.Literal(part_marker(view, "shape").to_comment())),
        sql.SQL(
            "CREATE FUNCTION {}({}) RETURNS SETOF {} LANGUAGE plpgsql STABLE SECURITY DEFINER "
            "SET search_path = {} SET plan_cache_mode = force_generic_plan ROWS 1 AS {}"
        ).format(
            function,
            arguments,
            shape,
            sql.Literal(sqltext.pinned_search_path(view.search_path)),
            body,
        ),
        sql.SQL("COMMENT ON FUNCTION {}({}) IS {}").format(
            function, arguments, sql.Literal(part_marker(view, "rows").to_comment())
        ),
        sql.SQL("REVOKE ALL ON FUNCTION {}({}) FROM PUBLIC").format(function, arguments),
        *(
            sql.SQL("GRANT EXECUTE ON FUNCTION {}({}) TO {}").format(function, arguments, grantee(role))
            for role in readers
        ),
        sql.SQL("CREATE VIEW {} AS {}").format(target, query(view, columns)),
        sql.SQL("COMMENT ON VIEW {} IS {}").format(target, sql.Literal(marker(view).to_comment())),
    ]


def drop_statements(view: MaterializedView, if_exists: bool = False) -> list[sql.Composed]:
    """The view first (it calls the function), then the function (its rows have the shape's type); a live
    view of format 1 had neither."""
    return [
        sql.SQL("DROP VIEW{} {}").format(sql.SQL(" IF EXISTS" if if_exists else ""), identifier(view)),
        sql.SQL("DROP FUNCTION IF EXISTS {}").format(function_identifier(view)),
        sql.SQL("DROP TABLE IF EXISTS {}").format(shape_identifier(view)),
    ]
