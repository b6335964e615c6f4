"""What a view reads, upwards: the relations behind it (through plain views, partitions included) with
a fingerprint of their data, for onlyIfChanged and dependency order; and what each name the query reads
resolves to, for the incremental key filter."""

from __future__ import annotations

from psycopg import sql

from matview.api import sqltext
from matview.api.spec import MaterializedView
from matview.errors import MatviewError
from matview.plan.observed import Connection, UpstreamRelation
from matview.plan.session import pin_name_resolution

#: What a fingerprint of a relation is made of (write counters, relfilenode, an upstream MV's marker), for
#: every relation in a CTE named ``relations``.
_RELATION_FACTS = sql.SQL("""
SELECT c.oid, n.nspname, c.relname, c.relkind, c.relfilenode, coalesce(s.n_tup_ins, 0), coalesce(s.n_tup_upd, 0),
       coalesce(s.n_tup_del, 0), CASE WHEN c.relkind = 'm' THEN obj_description(c.oid, 'pg_class') END
FROM relations JOIN pg_class c ON c.oid = relations.oid
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_stat_all_tables s ON s.relid = c.oid
WHERE c.relkind IN ('r', 'm', 'p', 'f')
ORDER BY c.oid
""")

_UPSTREAM = sql.SQL("""
WITH RECURSIVE deps(oid) AS (
    SELECT d.refobjid FROM pg_rewrite r
    JOIN pg_depend d ON d.objid = r.oid AND d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
    WHERE r.ev_class = %(oid)s AND d.refobjid <> %(oid)s
    UNION
    SELECT d.refobjid FROM deps
    JOIN pg_class c ON c.oid = deps.oid AND c.relkind = 'v'
    JOIN pg_rewrite r ON r.ev_class = c.oid
    JOIN pg_depend d ON d.objid = r.oid AND d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
    WHERE d.refobjid <> c.oid
), relations AS (
    SELECT deps.oid FROM deps
    UNION
    SELECT t.relid FROM deps JOIN pg_class c ON c.oid = deps.oid AND c.relkind = 'p',
                         LATERAL pg_partition_tree(c.oid) t
)
{}""").format(_RELATION_FACTS)

_KNOWN_RELATIONS = sql.SQL("""
WITH relations AS (
    SELECT unnest(%(oids)s::oid[]) AS oid
    UNION
    SELECT t.relid FROM pg_class c, LATERAL pg_partition_tree(c.oid) t
    WHERE c.oid = ANY(%(oids)s::oid[]) AND c.relkind = 'p'
)
{}""").format(_RELATION_FACTS)


def relation_fingerprints(conn: Connection, oids: list[int]) -> list[UpstreamRelation]:
    """The same facts as upstream_relations, for relations already known by oid (and their partitions)."""
    return [
        UpstreamRelation(int(row[0]), str(row[1]), str(row[2]), str(row[3]), (row[0], row[3], *row[4:]))
        for row in conn.execute(_KNOWN_RELATIONS, {"oids": oids}).fetchall()
    ]


def upstream_relations(conn: Connection, oid: int) -> list[UpstreamRelation]:
    """The one dependency query upwards: every relation the view with this oid reads (through views)."""
    return [
        UpstreamRelation(int(row[0]), str(row[1]), str(row[2]), str(row[3]), (row[0], row[3], *row[4:]))
        for row in conn.execute(_UPSTREAM, {"oid": oid}).fetchall()
    ]


def relation_oid(conn: Connection, schema: str, name: str) -> int | None:
    row = conn.execute(
        sql.SQL(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s"
        ),
        (schema, name),
    ).fetchone()
    return int(row[0]) if row else None


_RESOLVE = sql.SQL(
    "SELECT c.oid, n.nspname, c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.oid = to_regclass(%s)"
)

#: The most relations one query may reach through views before incremental refresh gives up on it.
MAX_RESOLVED_RELATIONS = 256


def resolve_relations(conn: Connection, view: MaterializedView) -> dict[sqltext.Reference, sqltext.ResolvedRelation]:
    """What every relation the query reads is, following plain views down to tables (for key filters).

    Names resolve as the build resolves them (pinned search_path); view definitions are read back with
    only pg_catalog on the search path, so every name in them comes back qualified."""
    found: dict[sqltext.Reference, sqltext.ResolvedRelation] = {}
    pending = [view.query]
    with conn.transaction():
        pin_name_resolution(conn, view, local=True)
        while pending:
            for reference in sqltext.relations_read(pending.pop()):
                if reference in found:
                    continue
                if len(found) >= MAX_RESOLVED_RELATIONS:
                    raise MatviewError(f"the query reaches more than {MAX_RESOLVED_RELATIONS} relations")
                schema, name = reference
                quoted = (sqltext.quote_identifier(schema) + "." if schema else "") + sqltext.quote_identifier(name)
                row = conn.execute(_RESOLVE, (quoted,)).fetchone()
                if row is None:
                    continue
                oid, resolved_schema, resolved_name, relkind = row
                definition = None
                if relkind == "v":
                    conn.execute(sql.SQL("SELECT set_config('search_path', 'pg_catalog', true)"))
                    text = conn.execute(sql.SQL("SELECT pg_get_viewdef(%s::oid)"), (oid,)).fetchone()
                    pin_name_resolution(conn, view, local=True)
                    definition = sqltext.check_view_definition(str(text[0]) if text else "")
                    pending.append(definition)
                resolved = sqltext.ResolvedRelation(
                    (str(resolved_schema), str(resolved_name)), str(relkind), definition
                )
                found[reference] = resolved
                found.setdefault(resolved.name, resolved)
    return found
