"""Observe: read what the database has, as plain data the pure planner can compare.

All reads go through the system catalogs (pg_class, pg_index, pg_description,
aclexplode, pg_depend/pg_rewrite) with names and values as parameters. The one
statement that is not a catalog read is describing the user's query (prepare
without executing) to learn its result columns, which is how source drift is seen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from matview.api import sqltext
from matview.api.spec import MaterializedView, Storage
from matview.errors import MatviewError
from matview.plan import capture, live
from matview.plan.marker import Marker

Connection = psycopg.Connection[tuple[Any, ...]]
"""Every connection the engine uses returns plain tuples."""

Column = tuple[str, str]
"""(name, type as format_type prints it)."""


@dataclass(frozen=True)
class IndexState:
    schema: str
    name: str
    table_oid: int
    marker: Marker | None
    valid: bool


@dataclass(frozen=True)
class RelationState:
    oid: int
    schema: str
    name: str
    relkind: str
    marker: Marker | None
    populated: bool
    columns: tuple[Column, ...]
    owner: str = ""
    """The role that owns it: markers are comments, which any owner can write, so a marker proves nothing
    unless the owner is one the engine trusts (statements.trusted_owners)."""
    has_triggers: bool = False


@dataclass(frozen=True)
class LivePart:
    """Something holding the name of the live view's function or row shape (plan/live.py), ours or not."""

    label: str
    owner: str
    marker: Marker | None


@dataclass(frozen=True)
class DependentView:
    """A view that reads the materialized view, captured so a swap can re-create it."""

    oid: int
    schema: str
    name: str
    relkind: str
    depth: int
    definition: str
    options: tuple[str, ...]
    owner: str
    comment: str | None
    acl: tuple[tuple[str, str, bool], ...]
    """(grantee or PUBLIC, privilege, grantable)."""
    has_triggers: bool


@dataclass(frozen=True)
class TableState:
    oid: int
    relkind: str
    columns: tuple[str, ...]
    column_types: tuple[tuple[int, int, str], ...] = ()
    """(type oid, typmod, as format_type prints it) for each of columns."""
    has_children: bool = False
    """Other tables inherit from it (or it is partitioned): writes to them fire none of its triggers."""
    readable: bool = True
    """The role that builds the view (spec.runAsRole, else the operator's) may SELECT from it."""
    system: bool = False
    """A system catalog (pg_catalog, information_schema, pg_toast)."""


@dataclass(frozen=True)
class KeyType:
    """The type of one of the view's key columns, as the query produces it."""

    oid: int
    typmod: int
    name: str
    hashable: bool
    """Has default btree and hash operator classes: the claim compares, hashes and indexes keys."""


@dataclass
class Observed:
    """Everything the planner needs to know about the database, for one resource."""

    current_user: str = ""
    schema_exists: bool = False
    relation: RelationState | None = None
    indexes: dict[str, IndexState] = field(default_factory=dict)
    """Indexes on the view, by name."""
    names_in_schema: dict[tuple[str, str], RelationState] = field(default_factory=dict)
    """Relations that hold a name the plan wants to use, by (schema, name)."""
    staging: list[RelationState] = field(default_factory=list)
    query_columns: tuple[Column, ...] | None = None
    query_error: str | None = None
    grants: dict[str, frozenset[str]] = field(default_factory=dict)
    """Privileges on the view by grantee (PUBLIC for everyone), the owner excluded."""
    roles: frozenset[str] = frozenset()
    tables: dict[tuple[str, str], TableState] = field(default_factory=dict)
    owned_supporting: list[IndexState] = field(default_factory=list)
    dependents: list[DependentView] = field(default_factory=list)
    run_as_role: RoleAccess | None = None
    """What the operator may do with spec.runAsRole (None when the spec names none)."""
    capture: capture.CaptureState | None = None
    """The view's change capture (observed for storage Table)."""
    live: RelationState | None = None
    """What holds the live view's name (observed for storage Table), ours or not."""
    live_parts: list[LivePart] = field(default_factory=list)
    """What holds the names of the live view's function and row shape."""
    key_types: dict[str, KeyType] = field(default_factory=dict)
    """The query's result columns that are declared keys (spec.incremental), by name."""
    key_catalog: dict[sqltext.Reference, sqltext.ResolvedRelation] | None = None
    """What each relation the query reads resolves to, through plain views (spec.incremental)."""
    key_catalog_error: str | None = None
    search_path_creators: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """spec.searchPath schemas → roles other than the owner that may CREATE in them (PUBLIC for everyone)."""
    filtered_query_error: str | None = None
    """Why the key-filtered query does not compile, when it does not (a refresh would fail every time)."""


@dataclass(frozen=True)
class RoleAccess:
    """Whether the connected role can build views as another role and then manage them."""

    exists: bool
    can_set: bool
    """SET ROLE to it is allowed (membership; PostgreSQL 16+: the SET option)."""
    has_privileges: bool
    """It holds the role's privileges (INHERIT), so it may alter, index, refresh and drop what that role owns."""
    superuser: bool = False
    """A superuser: every query of its views could do anything in the database."""

    @property
    def usable(self) -> bool:
        return self.exists and self.can_set and self.has_privileges


_RELATION = sql.SQL("""
SELECT c.oid, n.nspname, c.relname, c.relkind, obj_description(c.oid, 'pg_class'), c.relispopulated,
       coalesce(array_agg(a.attname ORDER BY a.attnum) FILTER (WHERE a.attnum > 0), '{}'),
       coalesce(array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum) FILTER (WHERE a.attnum > 0),
                '{}'),
       pg_get_userbyid(c.relowner), c.relhastriggers
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE n.nspname = %s AND c.relname = %s
GROUP BY c.oid, n.nspname
""")

_FUNCTIONS_NAMED = sql.SQL("""
SELECT pg_get_userbyid(p.proowner), obj_description(p.oid, 'pg_proc')
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = %s AND p.proname = %s
""")

_INDEXES_ON = sql.SQL("""
SELECT n.nspname, c.relname, i.indrelid, obj_description(c.oid, 'pg_class'), i.indisvalid
FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE i.indrelid = %s
""")

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

_TABLE = sql.SQL("""
SELECT c.oid, c.relkind,
       coalesce(array_agg(a.attname ORDER BY a.attnum) FILTER (WHERE a.attnum > 0), '{}'),
       coalesce(array_agg(a.atttypid::int8 ORDER BY a.attnum) FILTER (WHERE a.attnum > 0), '{}'),
       coalesce(array_agg(a.atttypmod ORDER BY a.attnum) FILTER (WHERE a.attnum > 0), '{}'),
       coalesce(array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum) FILTER (WHERE a.attnum > 0), '{}'),
       c.relkind = 'p' OR EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhparent = c.oid),
       has_table_privilege(coalesce(%(role)s, current_user), c.oid, 'SELECT'),
       n.nspname IN ('pg_catalog', 'information_schema') OR left(n.nspname, 8) = 'pg_toast'
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE n.nspname = %(schema)s AND c.relname = %(name)s
GROUP BY c.oid, n.nspname
""")

_CREATORS = sql.SQL("""
SELECT n.nspname,
       coalesce(array_agg(DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END
                          ORDER BY CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END)
                FILTER (WHERE a.privilege_type = 'CREATE' AND a.grantee <> n.nspowner), '{}')
FROM pg_namespace n LEFT JOIN LATERAL aclexplode(n.nspacl) a ON true
WHERE n.nspname = ANY(%s)
GROUP BY n.nspname
""")

_KEY_TYPES = sql.SQL("""
SELECT t.oid, format_type(t.oid, NULL),
       EXISTS (SELECT 1 FROM pg_opclass o JOIN pg_am m ON m.oid = o.opcmethod
               WHERE o.opcdefault AND m.amname = 'btree' AND (o.opcintype IN (t.oid, t.typbasetype, generic.oid)
                                                OR o.opcintype IN (SELECT c.casttarget FROM pg_cast c
                                                                   WHERE c.castsource = t.oid AND c.castmethod = 'b')))
       AND EXISTS (SELECT 1 FROM pg_opclass o JOIN pg_am m ON m.oid = o.opcmethod
                   WHERE o.opcdefault AND m.amname = 'hash' AND (o.opcintype IN (t.oid, t.typbasetype, generic.oid)
                                               OR o.opcintype IN (SELECT c.casttarget FROM pg_cast c
                                                                  WHERE c.castsource = t.oid AND c.castmethod = 'b')))
FROM pg_type t
LEFT JOIN pg_type generic ON generic.oid = CASE WHEN t.typcategory = 'A' THEN 'anyarray'::regtype
                                                WHEN t.typtype = 'e' THEN 'anyenum'::regtype
                                                WHEN t.typtype = 'r' THEN 'anyrange'::regtype END
WHERE t.oid = ANY(%s::oid[])
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


def describe_query(conn: Connection, query: sqltext.CheckedSQL) -> tuple[Column, ...]:
    """The query's result columns, learned by preparing it (it is not executed)."""
    return describe_query_types(conn, query)[0]


def key_types(
    conn: Connection, keys: tuple[str, ...], columns: tuple[Column, ...], types: tuple[tuple[int, int], ...]
) -> dict[str, KeyType]:
    """What the declared key columns are, and whether the claim can compare and hash them."""
    wanted = {name: typed for (name, _), typed in zip(columns, types, strict=True) if name in keys}
    found = {
        int(oid): (str(name), bool(hashable))
        for oid, name, hashable in conn.execute(_KEY_TYPES, ([oid for oid, _ in wanted.values()],))
    }
    return {name: KeyType(oid, typmod, *found.get(oid, ("?", False))) for name, (oid, typmod) in wanted.items()}


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
        if observed.relation.relkind in ("m", "r"):
            observed.dependents = read_dependents(conn, observed.relation.oid)
    if view.storage is Storage.TABLE or view.incremental is not None:
        observed.capture = read_capture(conn, view)
        found = conn.execute(_RELATION, (view.schema, live.name(view))).fetchone()
        observed.live = _relation(found) if found else None
        observed.live_parts = read_live_parts(conn, view)

    for oid, schema, name, relkind, comment, populated, table_oid, valid, owner in conn.execute(
        _OUR_OBJECTS, (marker_pattern(), owner_pattern(view.owner))
    ):
        marker = Marker.parse(comment)
        if marker is None or marker.owner != view.owner:
            continue
        if marker.kind == "staging" and relkind in ("m", "r"):
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
    for table_key in tables:
        if table_key not in observed.tables:
            found = conn.execute(
                _TABLE, {"schema": table_key[0], "name": table_key[1], "role": view.run_as_role}
            ).fetchone()
            if found:
                oid, relkind, names, type_oids, typmods, type_names, has_children, readable, system = found
                observed.tables[table_key] = TableState(
                    int(oid),
                    str(relkind),
                    tuple(names),
                    tuple(zip((int(t) for t in type_oids), typmods, type_names, strict=True)),
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
    if view.incremental is not None:
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
        if view.incremental is not None:
            observed.key_types = key_types(conn, view.incremental.key_columns, observed.query_columns, types)
    except psycopg.Error as exc:
        message = (exc.diag.message_primary or str(exc)).strip()
        observed.query_error = sqltext.explain_unresolved(message, exc.sqlstate, view.search_path)
        return observed
    if view.incremental is not None and observed.key_catalog is not None:
        observed.filtered_query_error = _filtered_query_error(conn, view, observed.key_catalog)
    return observed


def filtered_query_error(conn: Connection, view: MaterializedView) -> str | None:
    """Why an incremental refresh of view cannot compile its key-filtered query (None when it can)."""
    try:
        return _filtered_query_error(conn, view, resolve_relations(conn, view))
    except (psycopg.Error, MatviewError, ValueError) as exc:
        return str(exc).strip()


def _filtered_query_error(
    conn: Connection, view: MaterializedView, key_catalog: dict[sqltext.Reference, sqltext.ResolvedRelation]
) -> str | None:
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


def pin_name_resolution(conn: Connection, view: MaterializedView, local: bool) -> None:
    """Compile user SQL under sqltext.pinned_search_path, never the session's default search_path
    (the executor for every step, observe for describing the query)."""
    conn.execute(
        sql.SQL("SELECT set_config('search_path', %s, %s)"), (sqltext.pinned_search_path(view.search_path), local)
    )


def become_query_role(conn: Connection, view: MaterializedView) -> None:
    """Inside a transaction: act as spec.runAsRole until it ends (nothing when the spec names none)."""
    if view.run_as_role is not None:
        conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(view.run_as_role)))


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


@dataclass(frozen=True)
class UpstreamRelation:
    """A table, materialized view or foreign table a view reads, directly or through plain views."""

    oid: int
    schema: str
    name: str
    relkind: str
    fingerprint: tuple[Any, ...]
    """Changes when the relation's data may have: relfilenode, write counters, an upstream MV's marker."""


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


_CAPTURE_TRIGGERS = sql.SQL("""
SELECT n.nspname, c.relname, t.tgname, t.tgenabled = 'A'
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace pn ON pn.oid = p.pronamespace
WHERE left(t.tgname, length(%(prefix)s)) = %(prefix)s AND pn.nspname = %(schema)s AND p.proname = %(function)s
""")

#: Triggers named like this view's capture triggers that call something else (decoys, or a DBA's own).
_TRIGGERS_IN_THE_WAY = sql.SQL("""
SELECT n.nspname, c.relname, t.tgname, pn.nspname || '.' || p.proname
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace pn ON pn.oid = p.pronamespace
WHERE t.tgname = ANY(%(names)s) AND NOT (pn.nspname = %(schema)s AND p.proname = %(function)s)
""")

_CAPTURE_FUNCTION = sql.SQL("""
SELECT obj_description(p.oid, 'pg_proc'), pg_get_userbyid(p.proowner),
       p.prosrc, p.prosecdef AND p.proconfig IS NULL AND l.lanname = 'plpgsql' AND p.prorettype = 'trigger'::regtype
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace JOIN pg_language l ON l.oid = p.prolang
WHERE n.nspname = %s AND p.proname = %s AND p.pronargs = 0
""")


def read_capture(conn: Connection, view: MaterializedView) -> capture.CaptureState:
    """The view's change log, capture function and capture triggers, as they are."""
    log = conn.execute(_RELATION, (view.schema, capture.changes_name(view))).fetchone()
    function = conn.execute(_CAPTURE_FUNCTION, (view.schema, capture.function_name(view))).fetchone()
    triggers: dict[tuple[str, str], dict[str, bool]] = {}
    parameters = {
        "prefix": capture.trigger_prefix(view),
        "schema": view.schema,
        "function": capture.function_name(view),
    }
    for schema, table, name, enabled in conn.execute(_CAPTURE_TRIGGERS, parameters):
        triggers.setdefault((str(schema), str(table)), {})[str(name)] = bool(enabled)
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
        function=Marker.parse(function[0]) if function else None,
        function_exists=function is not None,
        triggers=triggers,
        changes_owner=changes.owner if changes else "",
        changes_has_triggers=changes.has_triggers if changes else False,
        function_owner=str(function[1]) if function else "",
        function_body=str(function[2]) if function else "",
        function_shape_ok=bool(function[3]) if function else False,
        triggers_in_the_way=in_the_way,
    )
