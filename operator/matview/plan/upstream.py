"""What a view reads, upwards: the relations behind it (through plain views, partitions included) with
a fingerprint of their data, for onlyIfChanged and dependency order; and what each name the query reads
resolves to, for the incremental key filter."""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from matview import lru
from matview.api import sqltext
from matview.api.spec import MaterializedView
from matview.errors import MatviewError
from matview.plan import session
from matview.plan.marker import comment_of
from matview.plan.observed import Connection, UpstreamRelation
from matview.plan.session import pin_name_resolution

#: What a fingerprint of a relation is made of (write counters, relfilenode, an upstream MV's marker), for
#: every relation in a CTE named ``relations``: the columns, and where they come from. Each relation is looked
#: up by its oid (a LATERAL with LIMIT, which the planner keeps as a nested loop on pg_class's oid index): a
#: hash join would scan all of pg_class, and this read runs on every refresh of every view. The counters are
#: read with the functions behind pg_stat_all_tables, not the view, which aggregates over every table.
_FACT_COLUMNS = sql.SQL("""
c.oid, c.nspname, c.relname, c.relkind, c.relfilenode, pg_stat_get_tuples_inserted(c.oid),
pg_stat_get_tuples_updated(c.oid), pg_stat_get_tuples_deleted(c.oid),
CASE WHEN c.relkind = 'm' THEN {comment} END""").format(comment=comment_of(sql.SQL("c.oid")))
_FACT_SOURCE = sql.SQL("""
FROM relations, LATERAL (SELECT c.oid, n.nspname, c.relname, c.relkind, c.relfilenode
                         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                         WHERE c.oid = relations.oid AND c.relkind IN ('r', 'm', 'p', 'f') LIMIT 1) c""")
_RELATION_FACTS = sql.SQL("SELECT {columns} {source} ORDER BY c.oid").format(columns=_FACT_COLUMNS, source=_FACT_SOURCE)
#: The same facts as one JSON array of arrays (a column of a larger read, e.g. the refresh's inspection).
RELATION_FACTS_JSON = sql.SQL(
    "(SELECT pg_catalog.json_agg(pg_catalog.json_build_array({columns}) ORDER BY c.oid) {source})"
).format(columns=_FACT_COLUMNS, source=_FACT_SOURCE)


def upstream_cte(oid: sql.Composable) -> sql.Composed:
    """The CTEs ``deps`` and ``relations`` (for a WITH RECURSIVE): every relation the relation whose oid is
    the expression oid reads, through plain views, partitions included. Every step is an index lookup by
    oid (rewrite rules by ev_class, dependencies by objid, a relkind by oid), per relation found (the
    LATERAL with OFFSET 0 keeps that shape), never a scan of pg_class or of all views' dependencies."""
    return sql.SQL("""
deps(oid) AS (
    SELECT d.refobjid FROM pg_rewrite r
    JOIN pg_depend d ON d.objid = r.oid AND d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
    WHERE r.ev_class = {oid} AND d.refobjid <> {oid}
    UNION
    SELECT read.refobjid FROM deps, LATERAL (
        SELECT d.refobjid FROM pg_rewrite r
        JOIN pg_depend d ON d.objid = r.oid AND d.classid = 'pg_rewrite'::regclass
                        AND d.refclassid = 'pg_class'::regclass
        WHERE r.ev_class = deps.oid AND d.refobjid <> deps.oid
        OFFSET 0) read
    WHERE (SELECT c.relkind FROM pg_class c WHERE c.oid = deps.oid) = 'v'
), relations AS (
    SELECT deps.oid FROM deps
    UNION
    SELECT t.relid FROM deps, LATERAL pg_partition_tree(deps.oid) t
    WHERE (SELECT c.relkind FROM pg_class c WHERE c.oid = deps.oid) = 'p'
)""").format(oid=oid)


_UPSTREAM = sql.SQL("WITH RECURSIVE {} {}").format(upstream_cte(sql.SQL("%(oid)s")), _RELATION_FACTS)

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
    return facts_from_rows(conn.execute(*fingerprints_query(oids)).fetchall())


def fingerprints_query(oids: list[int]) -> tuple[sql.Composed, dict[str, Any]]:
    """The read behind relation_fingerprints (facts_from_rows of its rows), for a caller's batch."""
    return _KNOWN_RELATIONS, {"oids": oids}


def upstream_relations(conn: Connection, oid: int) -> list[UpstreamRelation]:
    """The one dependency query upwards: every relation the view with this oid reads (through views)."""
    return facts_from_rows(conn.execute(_UPSTREAM, {"oid": oid}).fetchall())


def facts_from_rows(rows: Sequence[Sequence[Any]]) -> list[UpstreamRelation]:
    """UpstreamRelations from rows of the fact columns (or the arrays of RELATION_FACTS_JSON)."""
    return [
        UpstreamRelation(int(row[0]), str(row[1]), str(row[2]), str(row[3]), (row[0], row[3], *row[4:])) for row in rows
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


_READ_AS_CATALOG = sql.SQL("SELECT set_config('search_path', 'pg_catalog', true)")
#: What every name resolves to (NULLs for none), in the order given: a resolution's lookups, and its proof.
_NAMES_NOW = sql.SQL(
    "SELECT c.oid, n.nspname, c.relname, c.relkind "
    "FROM pg_catalog.unnest(%(names)s::pg_catalog.text[]) WITH ORDINALITY AS w (name, position) "
    "LEFT JOIN pg_catalog.pg_class AS c ON c.oid OPERATOR(pg_catalog.=) pg_catalog.to_regclass(w.name) "
    "LEFT JOIN pg_catalog.pg_namespace AS n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace "
    "ORDER BY w.position"
)
#: What every view is defined as, in the order given: a resolution's reads (as pg_catalog), and its proof.
_DEFINITIONS_NOW = sql.SQL(
    "SELECT pg_catalog.pg_get_viewdef(v.oid) "
    "FROM pg_catalog.unnest(%(oids)s::pg_catalog.oid[]) WITH ORDINALITY AS v (oid, position) ORDER BY v.position"
)

#: The most relations one query may reach through views before incremental refresh gives up on it.
MAX_RESOLVED_RELATIONS = 256


@dataclass(frozen=True)
class Resolution:
    """What the names a query reads resolve to, and the catalog facts it was made of: every name looked up
    with what it resolved to, and every view read with its definition. The same facts give the same
    resolution, so checking them again (one round trip) proves a remembered one current."""

    relations: sqltext.KeyCatalog
    oids: Mapping[sqltext.RelationName, int]
    names: tuple[str, ...]
    resolved: tuple[tuple[Any, ...], ...]
    """Per name: (oid, schema, name, relkind), or four NULLs when it resolves to nothing (a CTE's name)."""
    views: tuple[int, ...]
    definitions: tuple[str | None, ...]


#: Resolutions by database and query: a refresh of a Table view resolves its query every time (a plain view
#: it reads may have been redefined by hand since), which took a round trip per name and per view and a
#: parse of each view's definition, about a fifth of a small incremental refresh.
_RESOLUTIONS: lru.Memo[tuple[object, ...], Resolution] = lru.Memo(4096)


def resolve_relations(conn: Connection, view: MaterializedView) -> sqltext.KeyCatalog:
    """What every relation the query reads is, following plain views down to tables (for key filters)."""
    return resolution(conn, view).relations


def resolution(conn: Connection, view: MaterializedView) -> Resolution:
    """resolve_relations with the oids of the relations found: the one remembered for this query when the
    catalog still says what it was made of, else resolved again."""
    remembered = remembered_resolution(conn, view)
    if remembered is not None:
        with session.one_batch(conn):
            proof = send_proof(conn, view, remembered)
        if proof.holds():
            return remembered
    return resolve_again(conn, view)


def _memo_key(conn: Connection, view: MaterializedView) -> tuple[object, ...]:
    return (conn.info.host, conn.info.port, conn.info.dbname, view.query, view.search_path)


def remembered_resolution(conn: Connection, view: MaterializedView) -> Resolution | None:
    """The resolution last made for this query on this database, not yet proven current (send_proof)."""
    return _RESOLUTIONS.get(_memo_key(conn, view))


def resolve_again(conn: Connection, view: MaterializedView) -> Resolution:
    """Resolve the query's names from the catalog, and remember what they resolved to."""
    found = _resolve(conn, view)
    _RESOLUTIONS.put(_memo_key(conn, view), found)
    return found


@dataclass(frozen=True)
class Proof:
    """The reads that prove a remembered resolution current, sent in a batch (``holds`` once it is synced)."""

    remembered: Resolution
    names: psycopg.Cursor[Any]
    definitions: psycopg.Cursor[Any]

    def holds(self) -> bool:
        """The catalog still says what the remembered resolution was made of."""
        resolved_now = tuple(tuple(row) for row in self.names.fetchall())
        definitions_now = tuple(row[0] for row in self.definitions.fetchall())
        return resolved_now == self.remembered.resolved and definitions_now == self.remembered.definitions


def send_proof(conn: Connection, view: MaterializedView, remembered: Resolution) -> Proof:
    """Inside ``session.one_batch``: its own transaction (the names resolve as the build resolves them), so that
    a caller's reads can ride in the same round trip after it."""
    with session.transaction_in_batch(conn):
        pin_name_resolution(conn, view, local=True)
        names = conn.execute(_NAMES_NOW, {"names": list(remembered.names)})
        conn.execute(_READ_AS_CATALOG)
        definitions = conn.execute(_DEFINITIONS_NOW, {"oids": list(remembered.views)})
    return Proof(remembered, names, definitions)


def _resolve(conn: Connection, view: MaterializedView) -> Resolution:
    """Names resolve as the build resolves them (pinned search_path); view definitions are read back with
    only pg_catalog on the search path, so every name in them comes back qualified.

    A level at a time (the query's names, then the names its views' definitions read, and so on): every name of
    a level in one statement, then every view's definition among them in one round trip. The driver-matrix
    query, over six views, took 48 statements one by one (about 15 ms of a cold ``matview refresh``)."""
    found: dict[sqltext.Reference, sqltext.ResolvedRelation] = {}
    oids: dict[sqltext.RelationName, int] = {}
    names: list[str] = []
    resolved_rows: list[tuple[Any, ...]] = []
    views: list[int] = []
    definitions: list[str | None] = []

    def record(reference: sqltext.Reference, row: tuple[Any, ...], definition: sqltext.CheckedSQL | None) -> None:
        oid, resolved_schema, resolved_name, relkind = row
        resolved = sqltext.ResolvedRelation((str(resolved_schema), str(resolved_name)), str(relkind), definition)
        found[reference] = resolved
        found.setdefault(resolved.name, resolved)
        oids[resolved.name] = int(oid)

    pending = [view.query]
    with conn.transaction():
        pin_name_resolution(conn, view, local=True)
        while pending:
            level: dict[sqltext.Reference, str] = {}
            for text in pending:
                for reference in sqltext.relations_read(text):
                    if reference in found or reference in level:
                        continue
                    if len(found) + len(level) >= MAX_RESOLVED_RELATIONS:
                        raise MatviewError(f"the query reaches more than {MAX_RESOLVED_RELATIONS} relations")
                    schema, name = reference
                    level[reference] = (sqltext.quote_identifier(schema) + "." if schema else "") + (
                        sqltext.quote_identifier(name)
                    )
            pending = []
            if not level:
                break
            rows = conn.execute(_NAMES_NOW, {"names": list(level.values())}).fetchall()
            level_views: list[tuple[sqltext.Reference, tuple[Any, ...]]] = []
            for (reference, quoted), found_row in zip(level.items(), rows, strict=True):
                row = tuple(found_row)
                names.append(quoted)
                resolved_rows.append(row)
                if row[0] is None:
                    continue
                if row[3] == "v":
                    level_views.append((reference, row))
                else:
                    record(reference, row, None)
            if not level_views:
                continue
            with conn.pipeline():
                conn.execute(_READ_AS_CATALOG)
                texts = conn.execute(_DEFINITIONS_NOW, {"oids": [int(row[0]) for _, row in level_views]})
                pin_name_resolution(conn, view, local=True)
            for (reference, row), (text,) in zip(level_views, texts.fetchall(), strict=True):
                views.append(int(row[0]))
                definitions.append(text)
                definition = sqltext.check_view_definition(str(text) if text is not None else "")
                pending.append(definition)
                record(reference, row, definition)
    return Resolution(
        types.MappingProxyType(found),
        types.MappingProxyType(oids),
        tuple(names),
        tuple(resolved_rows),
        tuple(views),
        tuple(definitions),
    )
