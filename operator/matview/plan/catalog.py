"""Observe: read what the database has, as plain data the pure planner can compare.

All reads go through the system catalogs (pg_class, pg_index, pg_description,
aclexplode, pg_depend/pg_rewrite) with names and values as parameters. The one
statement that is not a catalog read is describing the user's query (prepare
without executing) to learn its result columns, which is how source drift is seen.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import psycopg
from psycopg import sql

from matview import comparisons
from matview.api import sqltext
from matview.api.spec import MaterializedView, Storage
from matview.errors import MatviewError
from matview.plan import capture, decoding, live
from matview.plan.describe import compile_error, describe_query_types, key_types
from matview.plan.marker import Marker, comment_of
from matview.plan.observed import (
    Connection,
    DependentView,
    IndexState,
    LivePart,
    Observed,
    OwnedSequence,
    RelationState,
    RoleAccess,
    TableState,
)
from matview.plan.session import become_query_role, pin_name_resolution
from matview.plan.upstream import resolve_relations

_RELATION = sql.SQL("""
SELECT c.oid, n.nspname, c.relname, c.relkind, {comment}, c.relispopulated,
       coalesce(array_agg(a.attname ORDER BY a.attnum) FILTER (WHERE a.attnum > 0), '{{}}'),
       coalesce(array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum) FILTER (WHERE a.attnum > 0),
                '{{}}'),
       pg_get_userbyid(c.relowner), c.relhastriggers
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE n.nspname = %s AND c.relname = %s
GROUP BY c.oid, n.nspname
""").format(comment=comment_of(sql.SQL("c.oid")))

_FUNCTIONS_NAMED = sql.SQL("""
SELECT pg_get_userbyid(p.proowner), obj_description(p.oid, 'pg_proc')
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = %s AND p.proname = %s
""")

_INDEXES_ON = sql.SQL("""
SELECT n.nspname, c.relname, i.indrelid, {comment}, i.indisvalid
FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE i.indrelid = %s
""").format(comment=comment_of(sql.SQL("c.oid")))

_OUR_OBJECTS = sql.SQL("""
SELECT c.oid, n.nspname, c.relname, c.relkind, d.description, c.relispopulated, coalesce(i.indrelid, 0),
       coalesce(i.indisvalid, true), pg_get_userbyid(c.relowner)
FROM pg_description d
JOIN pg_class c ON c.oid = d.objoid AND d.classoid = 'pg_class'::regclass AND d.objsubid = 0
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_index i ON i.indexrelid = c.oid
WHERE d.description LIKE %s AND d.description LIKE %s
""")

_GRANTS = sql.SQL("""
SELECT coalesce(r.rolname, 'PUBLIC'), acl.privilege_type
FROM pg_class c, aclexplode(c.relacl) acl
LEFT JOIN pg_roles r ON r.oid = acl.grantee
WHERE c.oid = %s AND acl.grantee <> c.relowner
""")


def dependents_exist(oid: sql.Composable) -> sql.Composed:
    """Whether any view reads the relation whose oid is the expression oid (the first level of _DEPENDENTS),
    for reads that need the full list only when there is one."""
    return sql.SQL("""EXISTS (
    SELECT 1 FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
    WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
      AND d.refobjid = {oid} AND r.ev_class <> {oid})""").format(oid=oid)


_DEPENDENTS = sql.SQL("""
WITH RECURSIVE deps(oid, depth) AS (
    SELECT r.ev_class, 1
    FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
    WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
      AND d.refobjid = %(oid)s AND r.ev_class <> %(oid)s
    UNION
    SELECT r.ev_class, deps.depth + 1
    FROM deps
    JOIN pg_depend d ON d.refobjid = deps.oid AND d.classid = 'pg_rewrite'::regclass
                    AND d.refclassid = 'pg_class'::regclass
    JOIN pg_rewrite r ON r.oid = d.objid
    WHERE r.ev_class <> deps.oid AND deps.depth < 50
)
SELECT c.oid, n.nspname, c.relname, c.relkind, max(deps.depth), pg_get_viewdef(c.oid),
       coalesce(c.reloptions, '{}'), pg_get_userbyid(c.relowner), obj_description(c.oid, 'pg_class'),
       coalesce((SELECT array_agg(ARRAY[coalesce(r.rolname, 'PUBLIC'), acl.privilege_type,
                                        acl.is_grantable::text])
                 FROM aclexplode(c.relacl) acl LEFT JOIN pg_roles r ON r.oid = acl.grantee
                 WHERE acl.grantee <> c.relowner), '{}'),
       EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid)
FROM deps JOIN pg_class c ON c.oid = deps.oid JOIN pg_namespace n ON n.oid = c.relnamespace
GROUP BY c.oid, n.nspname
ORDER BY max(deps.depth), c.oid
""")

# A domain column's type is given as its base type's (through domains over domains), as PostgreSQL describes a
# query's result columns: a key read from a domain column is produced as the base type.
_TABLE = sql.SQL("""
SELECT c.oid, c.relkind,
       coalesce(array_agg(a.attname ORDER BY a.attnum) FILTER (WHERE a.attnum > 0), '{{}}'),
       coalesce(array_agg(base.oid::int8 ORDER BY a.attnum) FILTER (WHERE a.attnum > 0), '{{}}'),
       coalesce(array_agg(base.typmod ORDER BY a.attnum) FILTER (WHERE a.attnum > 0), '{{}}'),
       coalesce(array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum) FILTER (WHERE a.attnum > 0), '{{}}'),
       c.relkind = 'p' OR EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhparent = c.oid),
       has_table_privilege(coalesce(%(role)s, current_user), c.oid, 'SELECT'),
       n.nspname IN ('pg_catalog', 'information_schema') OR left(n.nspname, 8) = 'pg_toast',
       coalesce(array_agg(seq.name ORDER BY a.attnum) FILTER (WHERE a.attnum > 0), '{{}}'),
       coalesce(array_agg(seq.cache ORDER BY a.attnum) FILTER (WHERE a.attnum > 0), '{{}}'),
       coalesce(array_agg(seq.increment ORDER BY a.attnum) FILTER (WHERE a.attnum > 0), '{{}}'),
       coalesce(array_agg(seq.readable ORDER BY a.attnum) FILTER (WHERE a.attnum > 0), '{{}}')
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN LATERAL (
    WITH RECURSIVE {chain} SELECT chain.oid, chain.typmod FROM chain ORDER BY chain.depth DESC LIMIT 1
) AS base ON true
LEFT JOIN LATERAL (  -- the sequence the column owns: pg_get_serial_sequence's dependency (serial, identity)
    SELECT format('%%I.%%I', sn.nspname, sc.relname) AS name, sq.seqcache AS cache, sq.seqincrement AS increment,
           has_sequence_privilege(sc.oid, 'SELECT') OR has_sequence_privilege(sc.oid, 'USAGE') AS readable
    FROM pg_depend d
    JOIN pg_sequence sq ON sq.seqrelid = d.objid
    JOIN pg_class sc ON sc.oid = d.objid
    JOIN pg_namespace sn ON sn.oid = sc.relnamespace
    WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
      AND d.refobjid = c.oid AND d.refobjsubid = a.attnum AND d.deptype IN ('a', 'i')
    LIMIT 1
) AS seq ON true
WHERE n.nspname = %(schema)s AND c.relname = %(name)s
GROUP BY c.oid, n.nspname
""").format(chain=comparisons.domain_chain(sql.SQL("a.atttypid"), sql.SQL("a.atttypmod")))

_CREATORS = sql.SQL("""
SELECT n.nspname,
       coalesce(array_agg(DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END
                          ORDER BY CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END)
                FILTER (WHERE a.privilege_type = 'CREATE' AND a.grantee <> n.nspowner), '{}')
FROM pg_namespace n LEFT JOIN LATERAL aclexplode(n.nspacl) a ON true
WHERE n.nspname = ANY(%s)
GROUP BY n.nspname
""")


def read_live_parts(conn: Connection, view: MaterializedView) -> list[LivePart]:
    parts = [
        LivePart(f"function {view.schema}.{live.function_name(view)}", str(owner), Marker.parse(comment))
        for owner, comment in conn.execute(_FUNCTIONS_NAMED, (view.schema, live.function_name(view)))
    ]
    found = conn.execute(_RELATION, (view.schema, live.shape_name(view))).fetchone()
    if found is not None:
        shape = _relation(found)
        parts.append(LivePart(f"relation {view.schema}.{shape.name}", shape.owner, shape.marker))
    return parts


def _relation(row: tuple[Any, ...]) -> RelationState:
    oid, schema, name, relkind, comment, populated, names, types, owner, has_triggers = row
    return RelationState(
        int(oid),
        str(schema),
        str(name),
        str(relkind),
        Marker.parse(comment),
        bool(populated),
        tuple(zip(names, types, strict=True)),
        str(owner),
        bool(has_triggers),
    )


def marker_pattern() -> str:
    """A LIKE pattern that finds comments which may be our markers (parsed afterwards to be sure)."""
    return '%"managedBy": "matview.dev"%'


def owner_pattern(owner: str) -> str:
    """A LIKE pattern that finds comments which may be markers of one owner (parsed afterwards to be sure).

    Without it every apply read and parsed the markers of every view in the database: O(views) per
    apply, O(views²) for a drift-check round (found by the scale benchmark at 3,000 views). Markers are
    written by ``Marker.to_comment`` (``json.dumps``), whose spelling of the owner this repeats."""
    needle = '"owner": ' + json.dumps(owner)
    escaped = needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def observe(
    conn: Connection,
    view: MaterializedView,
    extra_names: list[tuple[str, str]] | None = None,
) -> Observed:
    """Read the catalog state relevant to view. extra_names: (schema, name) pairs the plan may need."""
    observed = Observed()
    row = conn.execute(sql.SQL("SELECT current_user")).fetchone()
    observed.current_user = str(row[0]) if row else ""
    observed.schema_exists = (
        conn.execute(sql.SQL("SELECT 1 FROM pg_namespace WHERE nspname = %s"), (view.schema,)).fetchone() is not None
    )
    row = conn.execute(_RELATION, (view.schema, view.name)).fetchone()
    observed.relation = _relation(row) if row else None

    if observed.relation is not None:
        for schema, name, table_oid, comment, valid in conn.execute(_INDEXES_ON, (observed.relation.oid,)):
            observed.indexes[str(name)] = IndexState(
                str(schema),
                str(name),
                int(table_oid),
                Marker.parse(comment),
                bool(valid),
            )
        for grantee, privilege in conn.execute(_GRANTS, (observed.relation.oid,)):
            key = str(grantee)
            observed.grants[key] = observed.grants.get(key, frozenset()) | {str(privilege)}
        if observed.relation.relkind in ("m", "r", "p"):
            observed.dependents = read_dependents(conn, observed.relation.oid)
    if view.storage is Storage.TABLE or view.incremental is not None:
        observed.capture = read_capture(conn, view)
        observed.decoding = read_decoding(conn, view)
        found = conn.execute(_RELATION, (view.schema, live.name(view))).fetchone()
        observed.live = _relation(found) if found else None
        observed.live_parts = read_live_parts(conn, view)

    for oid, schema, name, relkind, comment, populated, table_oid, valid, owner in conn.execute(
        _OUR_OBJECTS, (marker_pattern(), owner_pattern(view.owner))
    ):
        marker = Marker.parse(comment)
        if marker is None or marker.owner != view.owner:
            continue
        if marker.kind == "staging" and relkind in ("m", "r", "p"):
            observed.staging.append(
                RelationState(
                    int(oid),
                    str(schema),
                    str(name),
                    str(relkind),
                    marker,
                    bool(populated),
                    (),
                    str(owner),
                )
            )
        elif marker.kind == "supporting":
            observed.owned_supporting.append(
                IndexState(
                    str(schema),
                    str(name),
                    int(table_oid),
                    marker,
                    bool(valid),
                )
            )

    for schema, name in extra_names or []:
        if (schema, name) in observed.names_in_schema:
            continue
        found = conn.execute(_RELATION, (schema, name)).fetchone()
        if found:
            state = _relation(found)
            observed.names_in_schema[(schema, name)] = state

    tables = [(index.table_schema, index.table) for index in view.supporting_indexes]
    tables += [source.relation for source in view.incremental.sources] if view.incremental else []
    tables += [source.relation for source in view.partitioning.sources] if view.partitioning else []
    for table_key in tables:
        if table_key not in observed.tables:
            found = conn.execute(
                _TABLE, {"schema": table_key[0], "name": table_key[1], "role": view.run_as_role}
            ).fetchone()
            if found:
                oid, relkind, names, type_oids, typmods, type_names, has_children, readable, system, *sequences = found
                observed.tables[table_key] = TableState(
                    int(oid),
                    str(relkind),
                    tuple(names),
                    tuple(zip((int(t) for t in type_oids), typmods, type_names, strict=True)),
                    tuple(
                        OwnedSequence(str(name), int(cache), int(increment), bool(may_read)) if name else None
                        for name, cache, increment, may_read in zip(*sequences, strict=True)
                    ),
                    bool(has_children),
                    bool(readable),
                    bool(system),
                )

    if view.search_path:
        observed.search_path_creators = {
            str(schema): tuple(roles) for schema, roles in conn.execute(_CREATORS, (list(view.search_path),)) if roles
        }
    wanted_roles = [grant.role for grant in view.grants]
    observed.roles = frozenset(
        str(r[0])
        for r in conn.execute(sql.SQL("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)"), (wanted_roles,))
    )

    if view.run_as_role is not None:
        observed.run_as_role = role_access(conn, view.run_as_role)
        if not observed.run_as_role.usable:
            return observed  # the planner reports the role; describing the query as it would only fail
    if view.incremental is not None or (view.partitioning is not None and view.partitioning.sources):
        try:
            observed.key_catalog = resolve_relations(conn, view)
        except (psycopg.Error, MatviewError, ValueError) as exc:
            observed.key_catalog_error = str(exc).strip()
    try:
        with conn.transaction():
            # Compiled exactly as the build will compile it: the pinned search_path, as runAsRole.
            pin_name_resolution(conn, view, local=True)
            become_query_role(conn, view)
            observed.query_columns, types = describe_query_types(conn, view.query)
        keys = view.incremental.key_columns if view.incremental is not None else ()
        partition = (view.partitioning.column,) if view.partitioning is not None else ()
        if keys or partition:  # one read for both: what the claim and what the partitioning compare
            typed = key_types(conn, (*keys, *partition), observed.query_columns, types)
            observed.key_types = {name: typed[name] for name in keys if name in typed}
            observed.partition_key = typed.get(partition[0]) if partition else None
    except psycopg.Error as exc:
        message = (exc.diag.message_primary or str(exc)).strip()
        observed.query_error = sqltext.explain_unresolved(message, exc.sqlstate, view.search_path)
        return observed
    if view.incremental is not None and observed.key_catalog is not None:
        observed.filtered_query_error = compile_error(conn, view, observed.key_catalog)
    return observed


_ROLE_ACCESS = sql.SQL("""
SELECT r.oid IS NOT NULL,
       coalesce(pg_has_role(current_user, r.oid, CASE WHEN current_setting('server_version_num')::int >= 160000
                                                      THEN 'SET' ELSE 'MEMBER' END), false),
       coalesce(pg_has_role(current_user, r.oid, 'USAGE'), false),
       coalesce(r.rolsuper, false)
FROM (SELECT %s::text AS name) wanted LEFT JOIN pg_roles r ON r.rolname = wanted.name
""")


def role_access(conn: Connection, role: str) -> RoleAccess:
    row = conn.execute(_ROLE_ACCESS, (role,)).fetchone()
    exists, can_set, has_privileges, superuser = row if row else (False, False, False, False)
    return RoleAccess(bool(exists), bool(can_set), bool(has_privileges), bool(superuser))


def read_dependents(conn: Connection, oid: int) -> list[DependentView]:
    """Views that read the relation, directly or through other views, shallowest first."""
    return [_dependent(conn, row) for row in conn.execute(_DEPENDENTS, {"oid": oid}).fetchall()]


def _dependent(conn: Connection, row: tuple[Any, ...]) -> DependentView:
    oid, schema, name, relkind, depth, _definition, options, owner, comment, acl, has_triggers = row
    # Re-read the definition with only pg_catalog on the search path so every name comes back qualified
    # and the re-created view does not depend on whichever search_path the engine's session has.
    with conn.transaction():
        conn.execute(sql.SQL("SELECT set_config('search_path', 'pg_catalog', true)"))
        found = conn.execute(sql.SQL("SELECT pg_get_viewdef(%s::oid)"), (oid,)).fetchone()
    definition = str(found[0]) if found else ""
    return DependentView(
        oid=int(oid),
        schema=str(schema),
        name=str(name),
        relkind=str(relkind),
        depth=int(depth),
        definition=definition,
        options=tuple(options),
        owner=str(owner),
        comment=comment if isinstance(comment, str) else None,
        acl=tuple((str(g), str(p), g2 == "true") for g, p, g2 in acl),
        has_triggers=bool(has_triggers),
    )


_CAPTURE_TRIGGERS = sql.SQL("""
SELECT n.nspname, c.relname, t.tgname, t.tgenabled = 'A', p.proname
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace pn ON pn.oid = p.pronamespace
WHERE left(t.tgname, length(%(prefix)s)) = %(prefix)s AND pn.nspname = %(schema)s AND p.proname = ANY(%(functions)s)
""")

#: Triggers named like this view's capture triggers that call something else (decoys, or a DBA's own).
_TRIGGERS_IN_THE_WAY = sql.SQL("""
SELECT n.nspname, c.relname, t.tgname, pn.nspname || '.' || p.proname
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace pn ON pn.oid = p.pronamespace
WHERE t.tgname = ANY(%(names)s) AND NOT (pn.nspname = %(schema)s AND p.proname = ANY(%(functions)s))
""")

#: Functions under this view's capture names, or named with its capture prefix (those of sources since removed).
_CAPTURE_FUNCTIONS = sql.SQL("""
SELECT p.proname, obj_description(p.oid, 'pg_proc'), pg_get_userbyid(p.proowner),
       p.prosrc, p.prosecdef AND p.proconfig IS NULL AND l.lanname = 'plpgsql' AND p.prorettype = 'trigger'::regtype
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace JOIN pg_language l ON l.oid = p.prolang
WHERE n.nspname = %(schema)s AND p.pronargs = 0
  AND (p.proname = ANY(%(names)s) OR left(p.proname, length(%(prefix)s)) = %(prefix)s)
""")


def read_capture(conn: Connection, view: MaterializedView) -> capture.CaptureState:
    """The view's change log, capture functions and capture triggers, as they are."""
    log = conn.execute(_RELATION, (view.schema, capture.changes_name(view))).fetchone()
    names = capture.function_candidates(view)
    found_functions = {}
    lookup = {"schema": view.schema, "names": names, "prefix": capture.function_prefix(view)}
    for name, comment, owner, body, shape_ok in conn.execute(_CAPTURE_FUNCTIONS, lookup):
        marker = Marker.parse(comment)
        # One of today's names is this view's to judge, whoever made it; a prefix match only when it says so
        # (a view whose name shares the cut prefix has functions there too).
        if name in names or (marker is not None and marker.owner == view.owner):
            found_functions[str(name)] = capture.FoundFunction(marker, str(owner), str(body), bool(shape_ok))
    triggers: dict[tuple[str, str], dict[str, capture.FoundTrigger]] = {}
    parameters = {"prefix": capture.trigger_prefix(view), "schema": view.schema, "functions": list(found_functions)}
    for schema, table, name, enabled, function in conn.execute(_CAPTURE_TRIGGERS, parameters):
        triggers.setdefault((str(schema), str(table)), {})[str(name)] = capture.FoundTrigger(
            bool(enabled), str(function)
        )
    in_the_way = {
        (str(schema), str(table)): f"trigger {name} calls {function}"
        for schema, table, name, function in conn.execute(
            _TRIGGERS_IN_THE_WAY, {**parameters, "names": list(capture.trigger_names(view).values())}
        )
    }
    changes = _relation(log) if log else None
    return capture.CaptureState(
        changes=changes.marker if changes else None,
        changes_exists=changes is not None,
        functions=found_functions,
        triggers=triggers,
        changes_owner=changes.owner if changes else "",
        changes_has_triggers=changes.has_triggers if changes else False,
        triggers_in_the_way=in_the_way,
    )


_DECODING = sql.SQL("""
SELECT pg_catalog.current_setting('wal_level'),
       (SELECT r.rolsuper OR r.rolreplication FROM pg_catalog.pg_roles AS r WHERE r.rolname = current_user),
       s.plugin, s.database = pg_catalog.current_database(), s.wal_status = 'lost', s.slot_name IS NOT NULL
FROM (SELECT) AS one
LEFT JOIN pg_catalog.pg_replication_slots AS s ON s.slot_name = %(slot)s::pg_catalog.name
""")
_PUBLICATION = sql.SQL(
    "SELECT pg_catalog.pg_get_userbyid(p.pubowner), pg_catalog.obj_description(p.oid, 'pg_publication'), {}, {} "
    "FROM pg_catalog.pg_publication AS p WHERE p.pubname = %(publication)s"
).format(decoding.PUBLISHES_EVERY_CHANGE, decoding.PUBLISHED_TABLES)
_IDENTITIES = sql.SQL("""
SELECT n.nspname, c.relname, c.relreplident,
       ARRAY(SELECT a.attname::pg_catalog.text
             FROM pg_catalog.pg_index AS i
             JOIN pg_catalog.pg_attribute AS a ON a.attrelid = c.oid AND a.attnum = ANY (i.indkey)
             WHERE i.indrelid = c.oid
               AND CASE c.relreplident WHEN 'd' THEN i.indisprimary WHEN 'i' THEN i.indisreplident ELSE false END)
FROM unnest(%(schemas)s::pg_catalog.text[], %(tables)s::pg_catalog.text[]) AS wanted (schema, name)
JOIN pg_catalog.pg_namespace AS n ON n.nspname = wanted.schema
JOIN pg_catalog.pg_class AS c ON c.relnamespace = n.oid AND c.relname = wanted.name
""")


def read_decoding(conn: Connection, view: MaterializedView) -> decoding.DecodingState:
    """The server's wal_level, the view's slot and publication, and what its sources log of an old row.
    (pg_publication_namespace exists from PostgreSQL 15; older servers fail this read with a clear error.)"""
    row = conn.execute(_DECODING, {"slot": decoding.slot_name(view)}).fetchone()
    assert row is not None
    wal_level, can_replicate, plugin, database_ours, lost, slot_exists = row
    state = decoding.DecodingState(
        wal_level=str(wal_level),
        can_replicate=bool(can_replicate),
        slot_exists=bool(slot_exists),
        slot_plugin=str(plugin or ""),
        slot_database_ours=bool(database_ours),
        slot_lost=bool(lost),
    )
    found = conn.execute(_PUBLICATION, {"publication": decoding.publication_name(view)}).fetchone()
    if found is not None:
        owner, comment, publishes_all, tables = found
        state = replace(
            state,
            publication_exists=True,
            publication_owner=str(owner),
            publication_marker=Marker.parse(comment),
            publication_publishes_all=bool(publishes_all),
            publication_tables=frozenset((str(t[0]), str(t[1])) for t in tables),
        )
    if decoding.uses_decoding(view):  # a drift check of every other Table view skips this read
        assert view.incremental is not None
        sources = view.incremental.sources
        rows = conn.execute(
            _IDENTITIES, {"schemas": [s.schema for s in sources], "tables": [s.table for s in sources]}
        ).fetchall()
        state = replace(
            state,
            identities={
                (str(schema), str(table)): decoding.SourceIdentity(str(replident), tuple(str(c) for c in columns))
                for schema, table, replident, columns in rows
            },
        )
    return state
