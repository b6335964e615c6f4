"""The live view of an incremental view: answers with every committed write, without waiting for a refresh.

``<name>_live`` (opt-in: ``spec.incremental.liveView``) returns, inside the reader's own snapshot:

- the stored rows whose key has no pending change in the change log, plus
- the user's query, key-filtered exactly as an incremental refresh filters it, for the pending keys;
- or, while a full rebuild is pending (a TRUNCATE, a repaired capture, a NULL key), the whole query: slow
  but correct, which is the original fallback from the view to its query, made automatic.

An incremental refresh claims keys from the log and rewrites their rows in one transaction, so any
snapshot sees a key either pending (and recomputed here) or applied (and stored): never both, never
neither. Writes to tables the declaration does not list are not in the log: they show after the next
refresh, as in the stored table.

The view belongs to the view's builder (spec.runAsRole, else the operator's role), reads the change log
with the SELECT the log grants that role, and is granted to spec.grants like the table. This module is
the pure half: its name, marker digest and statements; the planner decides when they run.
"""

from __future__ import annotations

from psycopg import sql

from matview.api import sqltext
from matview.api.spec import MaterializedView, truncate_utf8
from matview.constants import MAX_IDENTIFIER_BYTES
from matview.plan import capture
from matview.plan.marker import Marker

#: The CTE, inside the live view, that holds the keys with a pending change (the key filter reads it).
PENDING_KEYS = "matview_pending_keys"
_REBUILD = "matview_rebuild_pending"
_SUFFIX = "_live"
#: Changes when the shape of the statements below changes, so that apply re-creates older live views.
LIVE_FORMAT_VERSION = "1"


def name(view: MaterializedView) -> str:
    return truncate_utf8(view.name, MAX_IDENTIFIER_BYTES - len(_SUFFIX)) + _SUFFIX


def identifier(view: MaterializedView) -> sql.Identifier:
    return sql.Identifier(view.schema, name(view))


def wanted(view: MaterializedView) -> bool:
    return view.incremental is not None and view.incremental.live_view


def digest(view: MaterializedView) -> str:
    """What the live view was made from: the query and declaration, the capture format, this module's."""
    return f"{view.definition_digest}.{capture.capture_digest(view)}.{LIVE_FORMAT_VERSION}"


def marker(view: MaterializedView) -> Marker:
    """Ours, made from this definition; it names the stored table, whose unique indexes keyset pages use."""
    return Marker(view.owner, "live", digest(view), {"table": view.name})


def query(view: MaterializedView, key_catalog: dict[sqltext.Reference, sqltext.ResolvedRelation]) -> sql.Composed:
    """The live view's SELECT."""
    assert view.incremental is not None
    keys = view.incremental.key_columns
    filtered = capture.key_filtered_query(view, key_catalog, keys_table=(PENDING_KEYS,)).query
    pending, rebuild = sql.Identifier(PENDING_KEYS), sql.Identifier(_REBUILD)
    return sql.SQL(
        "WITH {pending} AS (SELECT DISTINCT {claimable_keys}),\n"
        "{rebuild} AS (SELECT EXISTS (SELECT FROM {log} AS l WHERE NOT ({claimable})) AS due)\n"
        "SELECT t.* FROM {table} AS t\n"
        "WHERE NOT (SELECT due FROM {rebuild})\n"
        "  AND NOT EXISTS (SELECT FROM {pending} AS p WHERE ROW({pending_keys}) = ROW({table_keys}))\n"
        "UNION ALL\n"
        "SELECT q.* FROM ({filtered}) AS q\n"
        "WHERE NOT (SELECT due FROM {rebuild}) AND ROW({query_keys}) IN (SELECT {keys} FROM {pending})\n"
        "UNION ALL\n"
        "SELECT q.* FROM ({query}) AS q WHERE (SELECT due FROM {rebuild})"
    ).format(
        pending=pending,
        rebuild=rebuild,
        claimable_keys=capture.claimable_keys(view),
        log=capture.changes_id(view),
        claimable=capture.claimable(view),
        table=sql.Identifier(view.schema, view.name),
        pending_keys=capture.key_list(keys, "p"),
        table_keys=capture.key_list(keys, "t"),
        filtered=sqltext.embed(filtered),
        query_keys=capture.key_list(keys, "q"),
        keys=capture.key_list(keys),
        query=sqltext.embed(view.query),
    )


def create_statements(
    view: MaterializedView, key_catalog: dict[sqltext.Reference, sqltext.ResolvedRelation]
) -> list[sql.Composed]:
    """(Re)create the live view with its marker; grants follow (the planner's, like the table's)."""
    target = identifier(view)
    return [
        sql.SQL("DROP VIEW IF EXISTS {}").format(target),
        sql.SQL("CREATE VIEW {} AS {}").format(target, query(view, key_catalog)),
        sql.SQL("COMMENT ON VIEW {} IS {}").format(target, sql.Literal(marker(view).to_comment())),
    ]


def drop_statement(view: MaterializedView) -> sql.Composed:
    return sql.SQL("DROP VIEW {}").format(identifier(view))
