"""Data versions and change signals: one number per view that moves whenever its data does, and one NOTIFY.

Applications cache what they read from a view; they need to know when it changed, cheaply and exactly.
Every step that makes new data live (create, swap, REFRESH, an incremental apply) also bumps the view's
row in ``<schema>.matview_versions`` and calls ``pg_notify``, in the same transaction: the version is
monotonic, commits with the data or not at all, and the notification is delivered when (and only when)
it commits. One notification per refresh, never one per row (each notifying commit takes a global lock).

The payload is JSON: ``{"relation", "version", "mode", "keysChanged", "keys"}``. An incremental apply
names the keys it recomputed when there are at most ``MAX_NOTIFIED_KEYS`` of them (and they fit in a
NOTIFY payload); otherwise ``keys`` is null and a reader treats every key as changed. The table and the
channel are read by ``matview.client.version`` and ``matview.client.listen``.
"""

from __future__ import annotations

from psycopg import sql

from matview.api import sqltext
from matview.api.spec import MaterializedView
from matview.plan import capture

#: The table, in each view's schema, with one row per view: its data version.
VERSIONS_TABLE = "matview_versions"
#: The one channel every view's change signal goes to (listeners filter by relation).
CHANNEL = "matview_changes"
#: An incremental apply of more keys than this says "keys: null" (everything may have changed).
MAX_NOTIFIED_KEYS = 100
#: PostgreSQL refuses NOTIFY payloads of 8,000 bytes or more; keys are left out well before that.
MAX_KEYS_BYTES = 6_000

CREATE_STATEMENTS = (
    sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} (relation text PRIMARY KEY, version bigint NOT NULL, "
        "changed_at timestamptz NOT NULL, mode text NOT NULL)"
    ),
    sql.SQL("GRANT SELECT ON {} TO PUBLIC"),
)


def relation_key(view: MaterializedView) -> str:
    """How the view is named in the versions table and in signals: ``schema.name`` as a reader writes it."""
    return f"{view.schema}.{view.name}"


def table(schema: str) -> sql.Identifier:
    return sql.Identifier(schema, VERSIONS_TABLE)


def create_statements(schema: str) -> list[sql.Composed]:
    return [statement.format(table(schema)) for statement in CREATE_STATEMENTS]


def bump_statements(
    view: MaterializedView, mode: str, keyed: bool = False, as_query_role: bool = True
) -> list[sql.Composed | sql.SQL]:
    """The last statements of a step that makes data live: bump the version and signal it (as the operator's
    role, which owns the versions table, whatever role built the data). keyed: the step's changed keys are
    in the incremental refresh's temporary table. as_query_role: the step may have taken spec.runAsRole (a
    REFRESH runs its query as the view's owner in a security-restricted operation, which cannot change the
    session's role, so it needs no RESET ROLE)."""
    keys: sql.Composable = sql.SQL("NULL::pg_catalog.int8, NULL::pg_catalog.json")
    if keyed:
        assert view.incremental is not None
        keys = sql.SQL(
            "(SELECT pg_catalog.count(*) FROM {keys_table}), "
            "(SELECT CASE WHEN pg_catalog.count(*) OPERATOR(pg_catalog.<=) {most} "
            "THEN pg_catalog.json_agg(pg_catalog.json_build_array({columns})) END FROM {keys_table})"
        ).format(
            keys_table=sql.Identifier(*sqltext.CHANGED_KEYS_TABLE),
            most=sql.Literal(MAX_NOTIFIED_KEYS),
            columns=capture.key_list(view.incremental.key_columns),
        )
    reset_role = [sql.SQL("RESET ROLE")] if as_query_role else []
    return [
        *reset_role,
        sql.SQL("""
WITH bumped AS (
    INSERT INTO {versions} AS v (relation, version, changed_at, mode)
    VALUES ({relation}, 1, pg_catalog.clock_timestamp(), {mode})
    ON CONFLICT (relation) DO UPDATE
    SET version = v.version OPERATOR(pg_catalog.+) 1, changed_at = excluded.changed_at, mode = excluded.mode
    RETURNING v.version
), changed (n, keys) AS (SELECT {keys})
SELECT pg_catalog.pg_notify({channel}, pg_catalog.json_build_object(
    'relation', {relation}, 'version', bumped.version, 'mode', {mode}, 'keysChanged', changed.n,
    'keys', CASE WHEN pg_catalog.length(changed.keys::pg_catalog.text) OPERATOR(pg_catalog.<) {max_bytes}
                 THEN changed.keys END)::pg_catalog.text)
FROM bumped, changed
""").format(
            versions=table(view.schema),
            relation=sql.Literal(relation_key(view)),
            mode=sql.Literal(mode),
            keys=keys,
            channel=sql.Literal(CHANNEL),
            max_bytes=sql.Literal(MAX_KEYS_BYTES),
        ),
    ]
