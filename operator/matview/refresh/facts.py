"""Catalog facts for refresh decisions: plain data, no decisions (those are in ``policy``).

Everything here is a read; it runs under the view's lock, so the names and indexes it reports are the
ones the refresh then acts on.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from matview.api.spec import MaterializedView, Storage
from matview.plan import capture, partitions, session, upstream, versions
from matview.plan.catalog import dependents_exist, read_dependents
from matview.plan.checks import query_tables
from matview.plan.marker import Marker, comment_of
from matview.plan.observed import Connection, UpstreamRelation
from matview.plan.statements import Query, retired_name, staging_name
from matview.plan.upstream import (
    RELATION_FACTS_JSON,
    Resolution,
    facts_from_rows,
    relation_fingerprints,
    relation_oid,
    resolution,
    upstream_cte,
    upstream_relations,
)
from matview.refresh import schedule
from matview.refresh.policy import Inspection, PendingChanges, RefreshState

#: The view, the copies a crashed Swap may have left beside it (staging, retired), whether any view reads it,
#: and (``{upstream_facts}``) the fingerprint facts of what it reads through views, in one read.
_VIEW = sql.SQL("""
WITH RECURSIVE target AS (
    SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = %(schema)s AND c.relname = %(name)s AND c.relkind = %(relkind)s
){upstream}
SELECT c.oid, c.relispopulated, {view_comment},
       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisunique AND i.indisvalid
                                        AND i.indpred IS NULL AND i.indexprs IS NULL),
       coalesce((SELECT array_agg(ic.relname::text ORDER BY ic.relname)
                 FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid WHERE i.indrelid = c.oid), '{{}}'),
       pg_get_userbyid(c.relowner) IN (current_user, %(role)s),
       coalesce((SELECT array_agg(ARRAY[l.relname::text, l.relkind::text, {copy_comment}]
                                  ORDER BY array_position(%(copies)s, l.relname::text))
                 FROM pg_class l
                 WHERE l.relnamespace = c.relnamespace AND l.relname = ANY(%(copies)s)
                   AND pg_get_userbyid(l.relowner) IN (current_user, %(role)s)), '{{}}'),
       {upstream_facts},
       {dependents}
FROM target JOIN pg_class c ON c.oid = target.oid
""")
_COMMENTS = {"view_comment": comment_of(sql.SQL("c.oid")), "copy_comment": comment_of(sql.SQL("l.oid"))}
_VIEW_AND_SOURCES = _VIEW.format(
    upstream=sql.Composed([sql.SQL(", "), upstream_cte(sql.SQL("(SELECT target.oid FROM target)"))]),
    upstream_facts=RELATION_FACTS_JSON,
    dependents=dependents_exist(sql.SQL("c.oid")),
    **_COMMENTS,
)
#: Without the fingerprints: walking what the view reads (recursively, through views) is most of the read's
#: cost, and only onlyIfChanged looks at the result.
_VIEW_ALONE = _VIEW.format(
    upstream=sql.SQL(""),
    upstream_facts=sql.SQL("NULL::pg_catalog.json"),
    dependents=dependents_exist(sql.SQL("c.oid")),
    **_COMMENTS,
)


def reads_fingerprints(view: MaterializedView) -> bool:
    """Whether the inspection reads the fingerprints of what the view reads through views: only onlyIfChanged
    decides from them (a table, which has no rewrite rule, resolves its query's relations apart, and only when
    onlyIfChanged or its incremental log needs them). Without them the state records no source version, so
    switching onlyIfChanged on refreshes once before it ever skips."""
    return view.refresh.only_if_changed and view.storage is Storage.MATERIALIZED_VIEW


_SIZES_AND_VERSION = sql.SQL(
    "SELECT c.relispopulated, c.reltuples::bigint, pg_table_size(c.oid), pg_indexes_size(c.oid), "
    "(SELECT v.version FROM {versions} v WHERE v.relation = %s) "
    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s"
)
_SIZES_AND_NO_VERSION = sql.SQL(
    "SELECT c.relispopulated, c.reltuples::bigint, pg_table_size(c.oid), pg_indexes_size(c.oid), %s::int8 "
    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s"
)

_MARKER = sql.SQL(
    "SELECT c.oid, {comment}, pg_get_userbyid(c.relowner) IN (current_user, %s) "
    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s"
).format(comment=comment_of(sql.SQL("c.oid")))


_PARTITIONS = sql.SQL("""
SELECT child.relname::pg_catalog.text, {comment},
       pg_catalog.pg_get_userbyid(child.relowner) OPERATOR(pg_catalog.=) ANY(ARRAY[current_user, %(role)s])
FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class child ON child.oid OPERATOR(pg_catalog.=) i.inhrelid
WHERE i.inhparent OPERATOR(pg_catalog.=) %(oid)s""").format(comment=comment_of(sql.SQL("child.oid")))
_NAMED_TABLES = sql.SQL("""
SELECT c.relname::pg_catalog.text, {comment}
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
WHERE n.nspname OPERATOR(pg_catalog.=) %(schema)s AND c.relname OPERATOR(pg_catalog.=) ANY(%(names)s)
  AND c.relkind OPERATOR(pg_catalog.=) 'r'
  AND pg_catalog.pg_get_userbyid(c.relowner) OPERATOR(pg_catalog.=) ANY(ARRAY[current_user, %(role)s])""").format(
    comment=comment_of(sql.SQL("c.oid"))
)


def partitions_to_rebuild(
    conn: Connection, view: MaterializedView, oid: int, now: dt.datetime
) -> tuple[list[partitions.PartitionFound], list[str]]:
    """A partitioned view's partitions (with when a rebuild made each, from markers of trusted owners) and
    the tables of ours an interrupted per-partition rebuild left beside it (to drop before it starts again)."""
    found = [
        partitions.PartitionFound(str(name), partitions.built_at(view, Marker.parse(comment)) if trusted else None)
        for name, comment, trusted in conn.execute(_PARTITIONS, {"role": view.run_as_role, "oid": oid})
    ]
    names = partitions.rebuild_leftover_names(view, found, now)
    leftovers = []
    for name, comment in conn.execute(_NAMED_TABLES, {"schema": view.schema, "names": names, "role": view.run_as_role}):
        marker = Marker.parse(comment)
        if marker is not None and marker.owner == view.owner and marker.kind == "staging":
            leftovers.append(str(name))
    return found, leftovers


def inspection_query(view: MaterializedView) -> Query:
    """The one read behind ``inspect`` (the refresh sends it with the lock's take, in one round trip)."""
    return _VIEW_AND_SOURCES if reads_fingerprints(view) else _VIEW_ALONE, {
        "role": view.run_as_role,
        # An incremental view's change log is read with the copies: whether it exists (and is ours).
        "copies": [staging_name(view), retired_name(view), *([capture.changes_name(view)] if view.incremental else [])],
        "schema": view.schema,
        "name": view.name,
        "relkind": view.relkind,
    }


def inspect(conn: Connection, view: MaterializedView) -> Inspection:
    """What decides the refresh mode: ownership, populated, a usable unique index, dependents, sources,
    and for incremental views the pending changes."""
    return inspected(conn, view, conn.execute(*inspection_query(view)).fetchone())


def marked_state(view: MaterializedView, row: tuple[Any, ...]) -> RefreshState | None:
    """The refresh state in the marker of inspection_query's row, by the rules ``inspected`` applies; None unless
    the view is ours and, for an incremental view, its change log is there: nothing may be written for a view
    that is not."""
    marker, ours = _view_marker(view, row)
    if marker is None or not ours or (view.incremental is not None and not _log_seen(view, row)):
        return None
    return RefreshState.from_marker(marker.state)


def _view_marker(view: MaterializedView, row: tuple[Any, ...]) -> tuple[Marker | None, bool]:
    """The view's marker in inspection_query's row, and whether it says the view is this resource's. A marker is a
    comment any owner can write: it proves ownership only on an object of a trusted role."""
    comment, trusted_owner = row[2], row[5]
    marker = Marker.parse(comment) if trusted_owner else None
    return marker, marker is not None and marker.owner == view.owner and marker.kind == "view"


def _log_seen(view: MaterializedView, row: tuple[Any, ...]) -> bool:
    """The incremental view's change log is among the row's copies (read only where a trusted role owns them)."""
    return view.incremental is not None and capture.changes_name(view) in {str(name) for name, _, _ in row[6]}


def inspected(conn: Connection, view: MaterializedView, row: tuple[Any, ...] | None) -> Inspection:
    """inspect, from the row of inspection_query already read (None: the view does not exist); what the row
    does not hold (dependents when there are some, a table's sources, pending changes) is read here."""
    if row is None:
        return Inspection()
    oid, populated, _, unique, indexes, _, copies, upstream, any_dependents = row
    marker, ours = _view_marker(view, row)
    log_seen = _log_seen(view, row)
    leftovers = []
    for name, relkind, copy_comment in copies:
        if log_seen and name == capture.changes_name(view):
            continue
        found = Marker.parse(copy_comment)
        if found is not None and found.owner == view.owner and found.kind == "staging":
            leftovers.append((str(name), str(relkind)))
    key_catalog = None
    pending = None
    untracked = None
    rows = None
    version = None
    if view.storage is Storage.TABLE:
        if view.incremental is not None or view.refresh.only_if_changed:
            table = _table_facts(conn, view, log_seen)
            key_catalog = table.resolved.relations
            version = _fingerprint(table.relations)
            if view.incremental is not None:
                pending, rows = table.pending, table.rows
                untracked = _untracked(view, table.relations)
    elif reads_fingerprints(view):
        version = _fingerprint(facts_from_rows(upstream or []))
    return Inspection(
        oid=int(oid),
        ours=ours,
        populated=bool(populated),
        concurrent_possible=bool(populated) and bool(unique) and view.storage is Storage.MATERIALIZED_VIEW,
        dependents=tuple(read_dependents(conn, int(oid))) if any_dependents else (),
        indexes=tuple(str(name) for name in indexes),
        marker=marker,
        source_version=version,
        leftovers=tuple(leftovers),
        key_catalog=key_catalog,
        pending=pending,
        untracked_version=untracked,
        estimated_rows=rows,
    )


@dataclass(frozen=True)
class _TableFacts:
    resolved: Resolution
    relations: list[UpstreamRelation]
    """Fingerprint facts of the tables the query reads."""
    pending: PendingChanges | None = None
    rows: int | None = None


def _table_facts(conn: Connection, view: MaterializedView, log_seen: bool) -> _TableFacts:
    """A Table's query resolved (it has no rewrite rule: the query is followed by name), the fingerprints of
    what it reads and, for an incremental view, its pending changes and estimated rows. When the remembered
    resolution still holds, all of it is one round trip: the reads for the remembered relations go in the
    proof's batch (and are thrown away when it fails)."""
    incremental = view.incremental is not None
    remembered = upstream.remembered_resolution(conn, view)
    if remembered is not None:
        with session.one_batch(conn):
            proof = upstream.send_proof(conn, view, remembered)
            known = conn.execute(*upstream.fingerprints_query(_query_oids(remembered)))
            size = conn.execute(*size_query(view)) if incremental else None
            pending = conn.execute(*_pending_query(view)) if incremental and log_seen else None
        if proof.holds():
            if pending is not None:
                found = _pending_from(pending.fetchone())
            else:  # no log among the inspection's trusted relations: read it (or its absence) as ever
                found = pending_changes(conn, view) if incremental else None
            rows = size_from_row(size.fetchone()).rows if size is not None else None
            return _TableFacts(remembered, facts_from_rows(known.fetchall()), found, rows)
    resolved = upstream.resolve_again(conn, view)
    relations = _query_relations(conn, resolved)
    if not incremental:
        return _TableFacts(resolved, relations)
    return _TableFacts(resolved, relations, pending_changes(conn, view), view_size(conn, view).rows)


def _untracked(view: MaterializedView, relations: list[UpstreamRelation]) -> str | None:
    """The fingerprint of the tables the query reads that are not declared sources (writes to them force a
    full rebuild of an incremental view)."""
    assert view.incremental is not None
    declared = {source.relation for source in view.incremental.sources}
    return _fingerprint([r for r in relations if (r.schema, r.name) not in declared])


def untracked_version(conn: Connection, view: MaterializedView) -> str | None:
    """_untracked, read from the catalog (after a build)."""
    return _untracked(view, _query_relations(conn, resolution(conn, view)))


def _fingerprint(relations: list[UpstreamRelation]) -> str | None:
    if any(r.relkind == "f" for r in relations):
        return None
    return hashlib.sha256(repr([r.fingerprint for r in relations]).encode()).hexdigest()[:24]


def _query_relations(conn: Connection, resolved: Resolution) -> list[UpstreamRelation]:
    return relation_fingerprints(conn, _query_oids(resolved))


def _query_oids(resolved: Resolution) -> list[int]:
    return [resolved.oids[name] for name in sorted(query_tables(resolved.relations)) if name in resolved.oids]


def source_version(conn: Connection, view: MaterializedView, oid: int) -> str | None:
    """A fingerprint of every table the view reads (through views): write counters and relfilenode.

    None when the query reads a foreign table, whose changes cannot be seen. Counters come from the
    statistics system, which a writing session reports within about a second of committing. A table
    (storage Table) has no rewrite rule to follow, so its query's relations are resolved by name.
    """
    if view.storage is Storage.TABLE:
        return _fingerprint(_query_relations(conn, resolution(conn, view)))
    return _fingerprint(upstream_relations(conn, oid))


_PENDING = sql.SQL("""
SELECT (SELECT count(*) FROM (SELECT DISTINCT {claimable_keys} LIMIT %(cap)s) AS d),
       coalesce((SELECT array_agg(DISTINCT {full}) FROM {log} WHERE {full} IS NOT NULL), '{{}}'),
       EXISTS (SELECT 1 FROM {log} AS l WHERE {null_keys}),
       (SELECT min({changed_at}) FROM {log})
""")


#: Counting distinct pending keys stops here: beyond it only "too many for an incremental refresh" matters.
MAX_COUNTED_KEYS = 10_000_000


def pending_changes(conn: Connection, view: MaterializedView) -> PendingChanges | None:
    """What the change log holds now (None when it does not exist: capture is not installed)."""
    try:
        return _pending_from(conn.execute(*_pending_query(view)).fetchone())
    except psycopg.errors.UndefinedTable:
        return None


def _pending_query(view: MaterializedView) -> Query:
    assert view.incremental is not None
    query = _PENDING.format(
        claimable_keys=capture.claimable_keys(view),
        log=capture.changes_id(view),
        full=sql.Identifier(capture.FULL_REBUILD),
        null_keys=capture.has_null_keys(view),
        changed_at=sql.Identifier(capture.CHANGED_AT),
    )
    return query, {"cap": MAX_COUNTED_KEYS}


def _pending_from(row: tuple[Any, ...] | None) -> PendingChanges | None:
    if row is None:
        return None
    count, reasons, null_keys, oldest = row
    return PendingChanges(int(count), tuple(str(r) for r in reasons), bool(null_keys), oldest)


@dataclass(frozen=True)
class ViewSize:
    populated: bool | None = None
    rows: int | None = None
    """pg_class.reltuples; None until the view was first analyzed."""
    table_bytes: int | None = None
    index_bytes: int | None = None
    data_version: int | None = None
    """The view's data version (plan/versions.py): bumped by every step that made new data live."""

    @property
    def total_bytes(self) -> int | None:
        if self.table_bytes is None or self.index_bytes is None:
            return None
        return self.table_bytes + self.index_bytes


def view_size(conn: Connection, view: MaterializedView) -> ViewSize:
    """Populated, estimated rows, sizes and data version of the view, in one read (empty when it cannot be
    read; no version where the schema has no versions table yet)."""
    try:
        row = conn.execute(*size_query(view)).fetchone()
    except psycopg.errors.UndefinedTable:
        try:
            row = conn.execute(_SIZES_AND_NO_VERSION, (None, view.schema, view.name)).fetchone()
        except psycopg.Error:
            return ViewSize()
    except psycopg.Error:
        return ViewSize()
    return size_from_row(row)


def size_query(view: MaterializedView) -> Query:
    """The read behind view_size and its parameters (it may also close a refresh's transaction)."""
    return _SIZES_AND_VERSION.format(versions=versions.table(view.schema)), (
        versions.relation_key(view),
        view.schema,
        view.name,
    )


def size_from_row(row: tuple[Any, ...] | None) -> ViewSize:
    if row is None:
        return ViewSize()
    populated, rows, table_bytes, index_bytes, version = row
    return ViewSize(
        bool(populated),
        int(rows) if rows is not None and rows >= 0 else None,
        int(table_bytes),
        int(index_bytes),
        int(version) if version is not None else None,
    )


def read_marker(conn: Connection, schema: str, name: str, run_as_role: str | None) -> tuple[int | None, Marker | None]:
    """The oid and our marker of the relation schema.name (None, None when it does not exist; no marker when
    it belongs to a role other than the operator's or run_as_role, whatever its comment says)."""
    row = conn.execute(_MARKER, (run_as_role, schema, name)).fetchone()
    if row is None:
        return None, None
    return int(row[0]), Marker.parse(row[1]) if row[2] else None


def read_state(conn: Connection, view: MaterializedView) -> RefreshState:
    """The persisted refresh state of view (empty when it has none)."""
    _, marker = read_marker(conn, view.schema, view.name, view.run_as_role)
    return RefreshState.from_marker(marker.state if marker else {})


def reads(conn: Connection, view: MaterializedView) -> frozenset[tuple[str, str]]:
    """The relations (schema, name) the view reads, through plain views; empty when it does not exist."""
    oid = relation_oid(conn, view.schema, view.name)
    return frozenset((r.schema, r.name) for r in upstream_relations(conn, oid)) if oid is not None else frozenset()


def dependency_order(conn: Connection, views: Iterable[MaterializedView]) -> list[MaterializedView]:
    """Views ordered so that each comes after the given views it reads (directly or through views)."""
    views = list(views)
    by_relation = {(v.schema, v.name): v for v in views}
    upstream: dict[str, set[str]] = {
        view.owner: {other.owner for r in reads(conn, view) if (other := by_relation.get(r)) and other is not view}
        for view in views
    }
    order = schedule.upstream_first([view.owner for view in views], upstream)
    by_owner = {view.owner: view for view in views}
    return [by_owner[owner] for owner in order]
