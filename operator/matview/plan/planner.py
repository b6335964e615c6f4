"""Plan: a pure function from (spec, observed catalog) to ordered steps of SQL.

No I/O happens here, so every decision — create, converge indexes, swap on a
changed query or drifted source, refuse to touch what is not ours — can be
tested without a database, and ``matview plan`` can show exactly what ``apply``
would run. Names go through ``sql.Identifier``; the user's query and predicates
only through ``sqltext.embed``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from psycopg import sql

from matview.api import sqltext
from matview.api.spec import IndexSpec, MaterializedView, SupportingIndexSpec, truncate_utf8
from matview.constants import MAX_IDENTIFIER_BYTES
from matview.errors import DependentObjectsError, FieldError, SpecError, UnmanagedObjectError
from matview.plan import capture, live, versions
from matview.plan.catalog import DependentView, IndexState, LivePart, Observed, RelationState, TableState
from matview.plan.marker import Marker

Statement = sql.Composed | sql.SQL
"""A complete statement, as the executor runs it."""

# Words that come from the spec or the catalog enter SQL only as these constants (the one door for text is
# sqltext.embed; tests/unit/test_one_door.py holds every other sql.SQL to a literal).
_METHODS = {
    "btree": sql.SQL("btree"),
    "hash": sql.SQL("hash"),
    "gin": sql.SQL("gin"),
    "gist": sql.SQL("gist"),
    "brin": sql.SQL("brin"),
}
_PRIVILEGES = {
    "SELECT": sql.SQL("SELECT"),
    "INSERT": sql.SQL("INSERT"),
    "UPDATE": sql.SQL("UPDATE"),
    "DELETE": sql.SQL("DELETE"),
    "TRUNCATE": sql.SQL("TRUNCATE"),
    "REFERENCES": sql.SQL("REFERENCES"),
    "TRIGGER": sql.SQL("TRIGGER"),
    "MAINTAIN": sql.SQL("MAINTAIN"),
}
#: The options of a dependent view that a swap carries over (read from the catalog), and their values.
_VIEW_OPTIONS = {
    "security_barrier": sql.SQL("security_barrier"),
    "security_invoker": sql.SQL("security_invoker"),
    "check_option": sql.SQL("check_option"),
}
_VIEW_OPTION_VALUES = {
    "true": sql.SQL("true"),
    "false": sql.SQL("false"),
    "on": sql.SQL("on"),
    "off": sql.SQL("off"),
    "local": sql.SQL("local"),
    "cascaded": sql.SQL("cascaded"),
}
_STAGING_SUFFIX = "_mv_staging"
_RETIRED_SUFFIX = "_mv_retired"


@dataclass(frozen=True)
class Step:
    """One unit of execution: its statements run in one transaction unless ``transactional`` is False."""

    description: str
    statements: tuple[Statement, ...]
    transactional: bool = True
    takes_exclusive_lock: bool = False
    """Waits for ACCESS EXCLUSIVE on a relation readers use: run with lock_timeout and retries."""
    cleanup: tuple[Statement, ...] = ()
    """Run (best effort, autocommit) when the step fails, e.g. to drop an INVALID index."""
    makes_data_live: bool = False
    """Readers see freshly computed data once this step commits (create, swap): it counts as a refresh."""
    runs_query: bool = False
    """Builds the view from the user's query: runs as spec.runAsRole when set (the new relation is its)."""
    repeatable_read: bool = False
    """Every statement of the step reads one snapshot (claiming changes and computing from them)."""
    drops_change_log: bool = False
    """Removes the change log (re-installed or no longer declared): what reads it must go first."""


@dataclass(frozen=True)
class Plan:
    view: MaterializedView
    steps: tuple[Step, ...] = ()
    reasons: tuple[str, ...] = ()
    """Why the plan does what it does (e.g. "source columns changed: ...")."""
    warnings: tuple[str, ...] = field(default=())
    incremental_query: sqltext.CheckedSQL | None = None
    """What an incremental refresh of this view runs: the query with the key filter injected at its sources."""

    @property
    def empty(self) -> bool:
        return not self.steps


def relation_id(schema: str, name: str) -> sql.Identifier:
    return sql.Identifier(schema, name)


def staging_name(view: MaterializedView) -> str:
    return truncate_utf8(view.name, MAX_IDENTIFIER_BYTES - len(_STAGING_SUFFIX)) + _STAGING_SUFFIX


def retired_name(view: MaterializedView) -> str:
    return truncate_utf8(view.name, MAX_IDENTIFIER_BYTES - len(_RETIRED_SUFFIX)) + _RETIRED_SUFFIX


def retired_index_name(name: str) -> str:
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    return truncate_utf8(name, MAX_IDENTIFIER_BYTES - 11) + "_old_" + digest


def staging_index_name(final_name: str) -> str:
    digest = hashlib.sha256(final_name.encode()).hexdigest()[:6]
    return truncate_utf8(final_name, MAX_IDENTIFIER_BYTES - 11) + "_stg_" + digest


def rebuild_index_name(final_name: str) -> str:
    digest = hashlib.sha256(final_name.encode()).hexdigest()[:6]
    return truncate_utf8(final_name, MAX_IDENTIFIER_BYTES - 11) + "_new_" + digest


def wanted_names(view: MaterializedView) -> list[tuple[str, str]]:
    """(schema, name) of every relation name the plan may create; observe() looks them up."""
    names = [(view.schema, staging_name(view)), (view.schema, retired_name(view))]
    if view.incremental is not None:
        names.append((view.schema, capture.changes_name(view)))
    for index in view.indexes:
        final = view.index_name(index)
        names += [
            (view.schema, final),
            (view.schema, staging_index_name(final)),
            (view.schema, rebuild_index_name(final)),
        ]
    for sup in view.supporting_indexes:
        final = view.index_name(sup)
        names += [(sup.table_schema, final), (sup.table_schema, rebuild_index_name(final))]
    return names


def create_index_sql(
    view: MaterializedView, index: IndexSpec, name: str, table: sql.Identifier, concurrently: bool
) -> sql.Composed:
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in index.columns)
    return sql.SQL("CREATE {unique}INDEX {concurrently}{name} ON {table} USING {method} ({columns}){where}").format(
        unique=sql.SQL("UNIQUE ") if index.unique else sql.SQL(""),
        concurrently=sql.SQL("CONCURRENTLY ") if concurrently else sql.SQL(""),
        name=sql.Identifier(name),
        table=table,
        method=_METHODS[index.method],
        columns=columns,
        where=sql.SQL(" WHERE {}").format(sqltext.embed(index.where)) if index.where else sql.SQL(""),
    )


#: The SQL keyword of each relkind the engine creates for a view's rows.
RELATION_KEYWORDS = {"m": sql.SQL("MATERIALIZED VIEW"), "r": sql.SQL("TABLE")}


def comment_sql(kind: str, target: sql.Identifier, marker: Marker, relkind: str = "m") -> sql.Composed:
    keyword = RELATION_KEYWORDS[relkind] if kind == "view" else sql.SQL("INDEX")
    return sql.SQL("COMMENT ON {} {} IS {}").format(keyword, target, sql.Literal(marker.to_comment()))


def _grantee(role: str) -> sql.Composable:
    return sql.SQL("PUBLIC") if role == "PUBLIC" else sql.Identifier(role)


def grant_sql(target: sql.Identifier, role: str, privileges: Iterable[str], revoke: bool = False) -> sql.Composed:
    words = sql.SQL(", ").join(_PRIVILEGES[p] for p in sorted(privileges))
    template = sql.SQL("REVOKE {} ON {} FROM {}") if revoke else sql.SQL("GRANT {} ON {} TO {}")
    return template.format(words, target, _grantee(role))


def _view_markers(view: MaterializedView) -> Marker:
    return Marker(view.owner, "view", view.definition_digest)


def _index_marker(view: MaterializedView, index: IndexSpec) -> Marker:
    kind = "supporting" if isinstance(index, SupportingIndexSpec) else "index"
    return Marker(view.owner, kind, index.definition_digest)  # type: ignore[arg-type]


def _not_ours(what: str, marker: Marker | None, owner: str = "") -> str:
    whose = f"managed by {marker.owner}" if marker else "not managed by matview-operator"
    if marker is not None and owner:
        whose = f"owned by role {owner!r}, which is neither the operator's role nor spec.runAsRole"
    return f"{what} exists and is not managed by this resource ({whose})"


def reading_warnings(view: MaterializedView) -> list[str]:
    """What `matview plan` tells about how applications can read the view (not a reason to change anything)."""
    if any(index.unique and index.where is None for index in view.indexes):
        return []
    return [
        "no unique index without a WHERE: keyset pages (matview.client.page, matview page) need one that their "
        "order covers; declare `indexes: [{columns: [<key>], unique: true}]`"
    ]


def trusted_owners(view: MaterializedView, observed: Observed) -> frozenset[str]:
    """The roles whose objects may carry this resource's markers: the operator's role, and spec.runAsRole,
    which owns the view it builds. A marker is a comment, which whoever owns an object can write: on an
    object of any other role it proves nothing, and the engine never adopts, alters or drops it."""
    return frozenset({observed.current_user, *([view.run_as_role] if view.run_as_role else [])})


def _is_ours(view: MaterializedView, observed: Observed, marker: Marker | None, owner: str) -> bool:
    return marker is not None and marker.owner == view.owner and owner in trusted_owners(view, observed)


@dataclass(frozen=True)
class ApplyPolicy:
    """What the platform team running the engine allows the people who write specs (never set by a spec)."""

    allow_superuser_run_as_role: bool = False
    """A spec.runAsRole that is a superuser is accepted (its queries could do anything in the database)."""


def build_plan(view: MaterializedView, observed: Observed, policy: ApplyPolicy | None = None) -> Plan:
    """Decide what brings the database to the spec. Raises SpecError/UnmanagedObjectError instead of guessing."""
    policy = policy or ApplyPolicy()
    errors: list[FieldError] = []
    if not observed.schema_exists:
        errors.append(FieldError("spec.schema", f"schema {view.schema!r} does not exist"))
    if observed.query_error is not None:
        errors.append(FieldError("spec.query", observed.query_error))
    query_columns = observed.query_columns or ()
    names = {c for c, _ in query_columns}
    if observed.query_columns is not None:
        for i, index in enumerate(view.indexes):
            for j, column in enumerate(index.columns):
                if column not in names:
                    errors.append(
                        FieldError(f"spec.indexes[{i}].columns[{j}]", f"column {column!r} is not in the query's result")
                    )
        duplicates = sorted({c for c, _ in query_columns if [n for n, _ in query_columns].count(c) > 1})
        if duplicates:
            errors.append(FieldError("spec.query", "result has duplicate column names: " + ", ".join(duplicates)))
    for i, grant in enumerate(view.grants):
        if grant.role != "PUBLIC" and grant.role not in observed.roles:
            errors.append(FieldError(f"spec.grants[{i}].role", f"role {grant.role!r} does not exist"))
    errors += _check_supporting(view, observed)
    errors += _check_incremental(view, observed)
    access = observed.run_as_role
    if access is not None and access.usable and access.superuser and not policy.allow_superuser_run_as_role:
        errors.append(
            FieldError(
                "spec.runAsRole",
                f"role {view.run_as_role!r} is a superuser: the view's query would run with every right in the "
                "database; name a role with only the rights its views need (an operator started with "
                "--allow-superuser-run-as-role accepts it)",
            )
        )
    if access is not None and not access.usable:
        role = view.run_as_role
        if not access.exists:
            errors.append(FieldError("spec.runAsRole", f"role {role!r} does not exist"))
        else:
            errors.append(
                FieldError(
                    "spec.runAsRole",
                    f"the operator's role {observed.current_user!r} cannot act as {role!r}: "
                    f"GRANT {role} TO {observed.current_user} (with SET and INHERIT)",
                )
            )
    if errors:
        raise SpecError(errors)

    relation = observed.relation
    if relation is not None and (
        relation.relkind not in RELATION_KEYWORDS
        or not _is_ours(view, observed, relation.marker, relation.owner)
        or relation.marker is None
        or relation.marker.kind != "view"
    ):
        raise UnmanagedObjectError(_not_ours(f"relation {view.relation}", relation.marker, relation.owner))
    _check_names_free(view, observed)

    steps: list[Step] = []
    reasons: list[str] = []
    warnings: list[str] = [
        f"spec.searchPath: roles other than its owner may CREATE in schema {schema!r} ({', '.join(roles)}): "
        "a function or operator planted there can run as the view's role; list only schemas nobody else writes"
        for schema, roles in sorted(observed.search_path_creators.items())
    ]
    steps += [
        drop_leftover_step(leftover.schema, leftover.name, leftover.relkind) for leftover in _leftovers(view, observed)
    ]
    # Capture first: from the moment the data is built, every write to a source is in the change log.
    steps += _converge_capture(view, observed, reasons)

    if relation is None:
        reasons.append(f"{view.relation} does not exist")
        steps.append(_create_step(view))
    else:
        drift = _source_drift(relation.columns, query_columns)
        query_changed = relation.marker is not None and relation.marker.digest != view.definition_digest
        if query_changed or drift:
            reasons.append(
                "query, searchPath, runAsRole or storage changed"
                if query_changed
                else f"source columns changed: {drift}"
            )
            unmanaged = sorted(n for n, s in observed.indexes.items() if s.marker is None)
            if unmanaged:
                warnings.append("indexes not managed by this resource are dropped by the swap: " + ", ".join(unmanaged))
            steps += swap_steps(
                view,
                _dependents_besides_live(view, observed),
                old_indexes=observed.indexes,
                old_relkind=relation.relkind,
            )
        else:
            steps += _converge_view(view, observed, reasons)
    steps += _converge_supporting(view, observed, reasons)
    steps = _converge_live(view, observed, steps, reasons)
    incremental_query = None
    if view.incremental is not None and observed.key_catalog is not None:
        incremental_query = capture.key_filtered_query(view, observed.key_catalog).query  # checked above: it succeeds
    return Plan(view, tuple(steps), tuple(reasons), tuple(warnings), incremental_query)


def _check_supporting(view: MaterializedView, observed: Observed) -> list[FieldError]:
    errors = []
    for i, index in enumerate(view.supporting_indexes):
        path = f"spec.supportingIndexes[{i}]"
        table = observed.tables.get((index.table_schema, index.table))
        label = f"{index.table_schema}.{index.table}"
        if table is None:
            errors.append(FieldError(f"{path}.table", f"table {label} does not exist"))
            continue
        if table.relkind in ("v", "m"):
            kind = "a view" if table.relkind == "v" else "a materialized view"
            errors.append(
                FieldError(
                    f"{path}.table",
                    f"{label} is {kind}, which cannot carry these indexes; "
                    "index the base tables the view reads instead",
                )
            )
            continue
        if table.relkind == "p":
            errors.append(
                FieldError(
                    f"{path}.table",
                    f"{label} is a partitioned table; CREATE INDEX "
                    "CONCURRENTLY cannot build on it, index its partitions instead",
                )
            )
            continue
        if table.relkind != "r":
            errors.append(FieldError(f"{path}.table", f"{label} is not a table"))
            continue
        for j, column in enumerate(index.columns):
            if column not in table.columns:
                errors.append(FieldError(f"{path}.columns[{j}]", f"column {column!r} does not exist in {label}"))
    return errors


def query_tables(key_catalog: dict[sqltext.Reference, sqltext.ResolvedRelation]) -> set[tuple[str, str]]:
    """Every relation holding data the query reads, through plain views (tables, MVs, foreign tables)."""
    return {r.name for r in key_catalog.values() if r.relkind != "v"}


def _check_incremental(view: MaterializedView, observed: Observed) -> list[FieldError]:
    """Refuse a declaration that is provably wrong: unknown columns, a source the query does not read."""
    if view.incremental is None:
        return []
    path = "spec.incremental"
    errors = []
    names = {c for c, _ in observed.query_columns or ()}
    for i, column in enumerate(view.incremental.key_columns):
        if observed.query_columns is not None and column not in names:
            errors.append(FieldError(f"{path}.keyColumns[{i}]", f"column {column!r} is not in the query's result"))
        if column in capture.RESERVED_COLUMNS:
            errors.append(FieldError(f"{path}.keyColumns[{i}]", f"{column!r} is a name the change log reserves"))
    if observed.key_catalog_error is not None:
        errors.append(FieldError("spec.query", f"cannot follow the query to its sources: {observed.key_catalog_error}"))
    if observed.filtered_query_error is not None:
        errors.append(
            FieldError(
                "spec.query",
                "the key filter cannot be injected here (an incremental refresh reads each source through a "
                f"subquery with the source's name as its alias): {observed.filtered_query_error}; "
                "refer to columns as table.column or alias.column, never schema.table.column",
            )
        )
    read = query_tables(observed.key_catalog) if observed.key_catalog is not None else None
    own = {(view.schema, view.name), (view.schema, capture.changes_name(view))}
    builder = view.run_as_role or observed.current_user
    for i, source in enumerate(view.incremental.sources):
        where = f"{path}.sources[{i}]"
        label = f"{source.schema}.{source.table}"
        table = observed.tables.get(source.relation)
        if source.relation in own:
            errors.append(FieldError(f"{where}.table", f"{label} is this view's own storage or change log"))
            continue
        if table is None:
            errors.append(FieldError(f"{where}.table", f"table {label} does not exist"))
            continue
        if table.system:
            errors.append(
                FieldError(f"{where}.table", f"{label} is a system catalog: it cannot carry capture triggers")
            )
            continue
        if table.has_children:
            errors.append(
                FieldError(
                    f"{where}.table",
                    f"{label} is partitioned or has inheritance children: writes made directly to them fire "
                    "none of its triggers, so they would be missed; read the tables that hold the rows instead",
                )
            )
            continue
        if not table.readable:
            errors.append(
                FieldError(
                    f"{where}.table",
                    f"role {builder!r}, which builds this view, may not read {label}: "
                    "capture is installed only on tables the view's role can read",
                )
            )
            continue
        if table.relkind not in ("r", "p"):
            errors.append(
                FieldError(
                    f"{where}.table", f"{label} is not a table (relkind {table.relkind}); declare the tables behind it"
                )
            )
            continue
        in_the_way = observed.capture.triggers_in_the_way.get(source.relation) if observed.capture else None
        if in_the_way:
            errors.append(
                FieldError(
                    f"{where}.table",
                    f"{label} already has a {in_the_way}, not this view's capture function: the engine never "
                    "drops a trigger it did not make; drop or rename it",
                )
            )
        for j, column in enumerate(source.columns):
            if column not in table.columns:
                errors.append(FieldError(f"{where}.columns[{j}]", f"column {column!r} does not exist in {label}"))
                continue
            problem = _key_type_problem(view, observed, table, j, column)
            if problem:
                errors.append(FieldError(f"{where}.columns[{j}]", problem))
        if read is not None and source.relation not in read:
            errors.append(
                FieldError(f"{where}.table", f"{label} is not read by the query (directly or through plain views)")
            )
    if errors or observed.key_catalog is None:
        return errors
    try:
        result = capture.key_filtered_query(view, observed.key_catalog)
    except ValueError as exc:
        return [FieldError(path, f"cannot inject the key filter: {exc}")]
    for i, source in enumerate(view.incremental.sources):
        if source.relation not in result.filtered:
            errors.append(
                FieldError(
                    f"{path}.sources[{i}].table",
                    f"{source.schema}.{source.table} is read only where a filter cannot be injected "
                    "(through a materialized view or inside a function)",
                )
            )
    return errors


def _key_type_problem(view: MaterializedView, observed: Observed, table: TableState, position: int, column: str) -> str:
    """Why the source column cannot feed the key column at position (its value is stored in the key's type
    by every writer's trigger: a conversion that can fail would make the writer's statement fail)."""
    assert view.incremental is not None
    if position >= len(view.incremental.key_columns) or not table.column_types:
        return ""
    key = view.incremental.key_columns[position]
    key_type = observed.key_types.get(key)
    if key_type is None:
        return ""
    source_oid, source_typmod, source_type = table.column_types[table.columns.index(column)]
    if not key_type.hashable:
        return (
            f"key column {key!r} is {key_type.name}, which has no default equality and hash operator classes; "
            "declare a key of a type that has (e.g. cast json to text, or use jsonb)"
        )
    if source_oid != key_type.oid or (key_type.typmod != -1 and key_type.typmod != source_typmod):
        return (
            f"column {column!r} is {source_type} but key column {key!r} is {key_type.name}: a written value that does "
            f"not convert would make the writer's statement fail; produce the key as {source_type} in the query"
        )
    return ""


def _converge_capture(view: MaterializedView, observed: Observed, reasons: list[str]) -> list[Step]:
    """Create, repair or remove the view's change capture. A repaired trigger also requests a full rebuild:
    writes made while it was missing were not recorded.

    The change log and the capture function belong to the operator's role, never to a team's role: the
    function runs as its owner on every write to a source (another team's table, perhaps), and a trigger
    on the log would run on every refresh. One owned by spec.runAsRole with our marker (made by an older
    operator) is re-created; one owned by anybody else is refused, whatever its comment says. A function
    whose body or settings differ from what the engine writes is restored, with a full rebuild."""
    state = observed.capture
    if state is None:
        return []
    if view.incremental is None:
        removal = _drop_capture_steps(view, observed, state)
        if removal:
            reasons.append("change capture is no longer declared")
        return removal
    steps: list[Step] = []
    wanted = {source.relation: source for source in view.incremental.sources}
    names = capture.trigger_names(view)
    log_label = f"relation {view.schema}.{capture.changes_name(view)}"
    function_label = f"function {view.schema}.{capture.function_name(view)}()"
    if state.changes_exists and not _is_ours(view, observed, state.changes, state.changes_owner):
        raise UnmanagedObjectError(_not_ours(log_label, state.changes, state.changes_owner))
    if state.function_exists and not _is_ours(view, observed, state.function, state.function_owner):
        raise UnmanagedObjectError(_not_ours(function_label, state.function, state.function_owner))
    operator = observed.current_user
    log_current = (
        state.changes_exists
        and state.changes is not None
        and state.changes.digest == capture.capture_digest(view)
        and state.changes_owner == operator
        and not state.changes_has_triggers
        and state.function is not None
        and state.function.digest == capture.capture_digest(view)
        and state.function_owner == operator
        and state.function_intact(view)
    )
    existing = state.triggers
    if not log_current:
        if not state.changes_exists:
            reasons.append("change capture is not installed")
        elif state.changes is not None and state.changes.digest != capture.capture_digest(view):
            reasons.append("the key declaration changed: change capture is re-installed")
        else:
            reasons.append(
                "the change log or capture function was altered or is not owned by the operator's role: "
                "change capture is re-installed"
            )
        if state.changes_exists or state.function_exists or existing:
            steps += _drop_capture_steps(view, observed, state)
        existing = {}
        steps.append(
            Step(
                f"create the change log {view.schema}.{capture.changes_name(view)} and its capture function",
                tuple(capture.create_log_statements(view)),
                runs_query=True,
            )
        )
    install: list[Statement] = []
    repaired: list[str] = []
    for relation in sorted(wanted):
        found = existing.get(relation, {})
        if set(found) == set(names.values()) and all(found.values()):
            continue
        label = f"{relation[0]}.{relation[1]}"
        install += capture.drop_trigger_statements(*relation, list(found))
        install += capture.create_trigger_statements(view, *relation)
        if log_current:
            repaired.append(label)
            reasons.append(f"capture triggers on {label} are missing or not enabled ALWAYS")
    if repaired or (install and observed.relation is not None) or (not log_current and observed.relation is not None):
        why = "capture was missing on " + ", ".join(repaired) if repaired else "change capture was installed"
        install.append(capture.request_full_rebuild(view, why))
    if install:
        steps.append(Step(f"install change capture on {len(install)} trigger statement(s)", tuple(install)))
    for relation, found in sorted(existing.items()):
        if relation not in wanted and found:
            reasons.append(f"{relation[0]}.{relation[1]} is no longer a source")
            steps.append(
                Step(
                    f"drop capture triggers on {relation[0]}.{relation[1]}",
                    tuple(capture.drop_trigger_statements(*relation, list(found))),
                )
            )
    return steps


def _live_is_ours(view: MaterializedView, observed: Observed) -> bool:
    found = observed.live
    return (
        found is not None
        and found.relkind == "v"
        and found.marker is not None
        and found.marker.kind == "live"
        and _is_ours(view, observed, found.marker, found.owner)
    )


def _dependents_besides_live(view: MaterializedView, observed: Observed) -> list[DependentView]:
    """The views reading the relation, but our live view, which the plan drops and makes again itself."""
    live_oid = observed.live.oid if observed.live is not None and _live_is_ours(view, observed) else None
    return [d for d in observed.dependents if d.oid != live_oid]


def _live_part_is_ours(view: MaterializedView, observed: Observed, part: LivePart) -> bool:
    return part.marker is not None and part.marker.kind == "live" and _is_ours(view, observed, part.marker, part.owner)


def _converge_live(view: MaterializedView, observed: Observed, steps: list[Step], reasons: list[str]) -> list[Step]:
    """Keep the live view (plan/live.py) in step: it reads the table and the change log, so anything that
    replaces either (a swap, re-installed capture) or changes the query drops it first and makes it again
    last; a live view no longer declared is dropped, with its function and row shape."""
    found = observed.live
    ours = _live_is_ours(view, observed)
    wanted = live.wanted(view)
    foreign_parts = [part for part in observed.live_parts if not _live_part_is_ours(view, observed, part)]
    if wanted and foreign_parts:
        part = foreign_parts[0]
        raise UnmanagedObjectError(_not_ours(part.label, part.marker, part.owner))
    if found is not None and not ours:
        if wanted:
            raise UnmanagedObjectError(_not_ours(f"relation {view.schema}.{found.name}", found.marker, found.owner))
        return steps  # somebody's own view with that name: not ours to touch
    current = ours and found is not None and found.marker is not None and found.marker.digest == live.digest(view)
    touched = any(step.makes_data_live or step.drops_change_log for step in steps)
    drop = ours and (not wanted or not current or touched)
    create = wanted and (not ours or drop)
    if drop or (not wanted and observed.live_parts and not foreign_parts):
        dropping = live.drop_statements(view, if_exists=not ours)
        if foreign_parts:  # a function or table of someone else's holds a name: leave it, drop only the view
            dropping = dropping[:1]
        steps = [Step(f"drop the live view {view.schema}.{live.name(view)}", tuple(dropping)), *steps]
        if not wanted:
            reasons.append("the live view is no longer declared")
    if create and observed.key_catalog is not None and observed.query_columns is not None:
        if not ours:
            reasons.append(f"the live view {view.schema}.{live.name(view)} does not exist")
        elif not current:
            reasons.append("the live view was made from another definition")
        columns = tuple(column for column, _ in observed.query_columns)
        statements: list[Statement] = [*live.create_statements(view, observed.key_catalog, columns)]
        statements += _grant_statements(view, live.identifier(view))
        steps = [
            *steps,
            Step(f"create the live view {view.schema}.{live.name(view)}", tuple(statements), runs_query=True),
        ]
    return steps


def _leftovers(view: MaterializedView, observed: Observed) -> list[RelationState]:
    """Copies a crashed swap left (staging, retired): dropped, but only when they are provably ours."""
    return [found for found in observed.staging if found.owner in trusted_owners(view, observed)]


def _drop_capture_steps(view: MaterializedView, observed: Observed, state: capture.CaptureState) -> list[Step]:
    statements: list[Statement] = []
    for (schema, table), found in sorted(state.triggers.items()):
        statements += capture.drop_trigger_statements(schema, table, list(found))
    if state.changes_exists and not _is_ours(view, observed, state.changes, state.changes_owner):
        state = replace(state, changes_exists=False)  # never ours to drop
    if state.function_exists and not _is_ours(view, observed, state.function, state.function_owner):
        state = replace(state, function_exists=False)
    statements += capture.drop_log_statements(view, state)
    if not statements:
        return []
    return [
        Step(f"remove the change capture of {view.relation}", tuple(statements), drops_change_log=state.changes_exists)
    ]


def _check_names_free(view: MaterializedView, observed: Observed) -> None:
    """A name the plan needs that belongs to something else stops the plan before any change."""
    for (schema, name), holder in observed.names_in_schema.items():
        marker = holder.marker
        if _is_ours(view, observed, marker, holder.owner):
            continue
        if observed.relation is not None and name in observed.indexes and marker is None:
            continue  # an unmanaged index on our own view: converge leaves it alone
        raise UnmanagedObjectError(_not_ours(f"relation {schema}.{name}", marker, holder.owner))


def _source_drift(current: tuple[tuple[str, str], ...], wanted: tuple[tuple[str, str], ...]) -> str:
    if current == wanted:
        return ""
    before = {n: t for n, t in current}
    after = {n: t for n, t in wanted}
    parts = [f"+{n} {t}" for n, t in wanted if n not in before]
    parts += [f"-{n}" for n, _ in current if n not in after]
    parts += [f"{n} {before[n]} -> {after[n]}" for n, _ in wanted if n in before and before[n] != after[n]]
    return ", ".join(parts) or "column order changed"


def _build_statements(
    view: MaterializedView,
    name: str,
    index_name: dict[str, str],
    marker: Marker,
) -> list[Statement]:
    target = relation_id(view.schema, name)
    statements: list[Statement] = [
        sql.SQL("CREATE {} {} AS {} WITH DATA").format(
            RELATION_KEYWORDS[view.storage.relkind], target, sqltext.embed(view.query)
        ),
    ]
    for index in view.indexes:
        final = view.index_name(index)
        statements.append(create_index_sql(view, index, index_name[final], target, concurrently=False))
        statements.append(comment_sql("index", relation_id(view.schema, index_name[final]), _index_marker(view, index)))
    statements.append(comment_sql("view", target, marker, view.storage.relkind))
    # A new relation has no statistics; without them the first queries on it plan blind.
    statements.append(sql.SQL("ANALYZE {}").format(target))
    return statements


def _grant_statements(view: MaterializedView, target: sql.Identifier) -> list[Statement]:
    return [grant_sql(target, grant.role, grant.privileges) for grant in view.grants]


def _create_step(view: MaterializedView) -> Step:
    names = {view.index_name(i): view.index_name(i) for i in view.indexes}
    statements = _build_statements(view, view.name, names, _view_markers(view))
    statements += _grant_statements(view, relation_id(view.schema, view.name))
    statements += versions.bump_statements(view, "Create")
    return Step(
        f"create {view.relation} with {len(view.indexes)} index(es)",
        tuple(statements),
        makes_data_live=True,
        runs_query=True,
        # Capture is installed first (so no write is missed); if the first build fails, nothing of it may stay
        # on a source table: triggers there would make every writer pay for a view that does not exist.
        cleanup=tuple(capture.uninstall_statements(view)) if view.incremental is not None else (),
    )


def swap_steps(
    view: MaterializedView,
    dependents: list[DependentView],
    state: dict[str, Any] | None = None,
    old_indexes: Iterable[str] = (),
    old_relkind: str | None = None,
) -> list[Step]:
    """Build a fresh copy beside the old one, swap it in by renames in one short transaction, then drop the old.

    The swap transaction holds ACCESS EXCLUSIVE on the view, so it only renames: the old copy and its
    indexes are retired under other names (marked as ours) and dropped afterwards, when no new reader
    can reach them — unlinking their files never happens while readers wait.
    """
    blocked = [d for d in dependents if d.relkind != "v" or d.has_triggers]
    if blocked:
        names = ", ".join(
            f"{d.schema}.{d.name}" + (" (has triggers)" if d.has_triggers else f" (relkind {d.relkind})")
            for d in blocked
        )
        raise DependentObjectsError(
            f"{view.relation} must be rebuilt but these objects depend on it and cannot be "
            f"re-created automatically: {names}"
        )
    staging = staging_name(view)
    retired = retired_name(view)
    new_kind = RELATION_KEYWORDS[view.storage.relkind]
    old_kind = RELATION_KEYWORDS[old_relkind or view.storage.relkind]
    index_names = {view.index_name(i): staging_index_name(view.index_name(i)) for i in view.indexes}
    claim: list[Statement] = list(capture.claim_for_swap(view)) if view.incremental is not None else []
    build = Step(
        f"build the new copy {view.schema}.{staging} with its indexes (readers keep the old one)",
        tuple(
            claim + _build_statements(view, staging, index_names, Marker(view.owner, "staging", view.definition_digest))
        ),
        cleanup=(sql.SQL("DROP {} IF EXISTS {}").format(new_kind, relation_id(view.schema, staging)),),
        runs_query=True,
        repeatable_read=bool(claim),
    )
    target = relation_id(view.schema, view.name)
    swap: list[Statement] = [
        sql.SQL("DROP VIEW {}").format(relation_id(d.schema, d.name))
        for d in sorted(dependents, key=lambda d: -d.depth)
    ]
    for name in sorted(old_indexes):
        swap.append(
            sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                relation_id(view.schema, name), sql.Identifier(retired_index_name(name))
            )
        )
    swap.append(sql.SQL("ALTER {} {} RENAME TO {}").format(old_kind, target, sql.Identifier(retired)))
    swap.append(
        comment_sql(
            "view",
            relation_id(view.schema, retired),
            Marker(view.owner, "staging", "retired"),
            old_relkind or view.storage.relkind,
        )
    )
    swap.append(
        sql.SQL("ALTER {} {} RENAME TO {}").format(
            new_kind, relation_id(view.schema, staging), sql.Identifier(view.name)
        )
    )
    for final, temporary in index_names.items():
        swap.append(
            sql.SQL("ALTER INDEX {} RENAME TO {}").format(relation_id(view.schema, temporary), sql.Identifier(final))
        )
    swap.append(comment_sql("view", target, replace(_view_markers(view), state=state or {}), view.storage.relkind))
    if view.incremental is not None:
        swap.append(capture.swap_committed(view))
    swap += _grant_statements(view, target)
    for dependent in sorted(dependents, key=lambda d: d.depth):
        swap += _recreate_dependent(dependent)
    swap += versions.bump_statements(view, "Swap")
    return [
        build,
        Step(
            f"swap the new copy in for {view.relation}"
            + (f" and re-create {len(dependents)} dependent view(s)" if dependents else ""),
            tuple(swap),
            takes_exclusive_lock=True,
            cleanup=(sql.SQL("DROP {} IF EXISTS {}").format(new_kind, relation_id(view.schema, staging)),),
            makes_data_live=True,
        ),
        Step(
            f"drop the retired copy {view.schema}.{retired}",
            (sql.SQL("DROP {} {}").format(old_kind, relation_id(view.schema, retired)),),
            takes_exclusive_lock=True,
        ),
    ]


def drop_leftover_step(schema: str, name: str, relkind: str = "m") -> Step:
    """Drop a staging or retired copy of ours that an interrupted build or swap left behind."""
    return Step(
        f"drop leftover copy {schema}.{name}",
        (sql.SQL("DROP {} {}").format(RELATION_KEYWORDS[relkind], relation_id(schema, name)),),
    )


def refresh_in_place_step(view: MaterializedView, mode: str) -> Step:
    """REFRESH [CONCURRENTLY]: CONCURRENTLY waits only behind other writers, plain REFRESH behind readers."""
    concurrently = sql.SQL("CONCURRENTLY ") if mode == "Concurrent" else sql.SQL("")
    target = relation_id(view.schema, view.name)
    return Step(
        f"refresh {view.relation}" + (" concurrently" if mode == "Concurrent" else " (readers wait)"),
        (sql.SQL("REFRESH MATERIALIZED VIEW {}{}").format(concurrently, target), *versions.bump_statements(view, mode)),
        takes_exclusive_lock=True,
        makes_data_live=True,
    )


def record_state_step(view: MaterializedView, marker: Marker) -> Step:
    """Write the view's marker with its refresh state (the last step of every refresh)."""
    return Step(
        f"record the refresh state of {view.relation}",
        (comment_sql("view", relation_id(view.schema, view.name), marker, view.storage.relkind),),
    )


def incremental_step(view: MaterializedView, filtered_query: sqltext.CheckedSQL, keys: int) -> Step:
    """Apply the changed keys in one transaction: readers see all of it at commit, or none of it."""
    return Step(
        f"apply {keys} changed key(s) to {view.relation}",
        (*capture.incremental_statements(view, filtered_query), *versions.bump_statements(view, "Incremental", True)),
        makes_data_live=True,
        runs_query=True,
        repeatable_read=True,
    )


def _recreate_dependent(dependent: DependentView) -> list[Statement]:
    target = relation_id(dependent.schema, dependent.name)
    options = []
    for option in dependent.options:
        key, _, value = option.partition("=")
        if key not in _VIEW_OPTIONS or value.lower() not in _VIEW_OPTION_VALUES:
            raise DependentObjectsError(
                f"dependent view {dependent.schema}.{dependent.name} has option {option!r}, "
                "which the swap cannot carry over"
            )
        options.append(sql.SQL("{} = {}").format(_VIEW_OPTIONS[key], _VIEW_OPTION_VALUES[value.lower()]))
    with_options = sql.SQL(" WITH ({})").format(sql.SQL(", ").join(options)) if options else sql.SQL("")
    definition = sqltext.check_view_definition(dependent.definition)
    statements: list[Statement] = [
        sql.SQL("CREATE VIEW {}{} AS {}").format(target, with_options, sqltext.embed(definition)),
        sql.SQL("ALTER VIEW {} OWNER TO {}").format(target, sql.Identifier(dependent.owner)),
    ]
    for grantee, privilege, grantable in dependent.acl:
        if privilege not in _PRIVILEGES:
            continue
        statement = grant_sql(target, grantee, [privilege])
        statements.append(statement + sql.SQL(" WITH GRANT OPTION") if grantable else statement)
    if dependent.comment is not None:
        statements.append(sql.SQL("COMMENT ON VIEW {} IS {}").format(target, sql.Literal(dependent.comment)))
    return statements


def _index_steps(
    view: MaterializedView,
    index: IndexSpec,
    table: sql.Identifier,
    schema: str,
    existing: IndexState | None,
    reasons: list[str],
    label: str,
) -> list[Step]:
    final = view.index_name(index)
    marker = _index_marker(view, index)
    target = relation_id(schema, final)
    create = create_index_sql(view, index, final, table, concurrently=True)
    drop_final = sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(target)
    if existing is None:
        reasons.append(f"{label} {final} is missing")
        return [
            Step(f"create {label} {final} (CONCURRENTLY)", (create,), transactional=False, cleanup=(drop_final,)),
            Step(f"mark {label} {final}", (comment_sql("index", target, marker),)),
        ]
    if not existing.valid:
        reasons.append(f"{label} {final} is INVALID (an earlier build failed)")
        return [
            Step(f"drop invalid {label} {final}", (drop_final,), transactional=False),
            Step(f"create {label} {final} (CONCURRENTLY)", (create,), transactional=False, cleanup=(drop_final,)),
            Step(f"mark {label} {final}", (comment_sql("index", target, marker),)),
        ]
    if existing.marker is not None and existing.marker.digest != marker.digest:
        reasons.append(f"{label} {final} definition changed")
        temporary = rebuild_index_name(final)
        temporary_id = relation_id(schema, temporary)
        return [
            Step(
                f"build the changed {label} {final} beside the old one (CONCURRENTLY)",
                (create_index_sql(view, index, temporary, table, concurrently=True),),
                transactional=False,
                cleanup=(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(temporary_id),),
            ),
            Step(
                f"replace {label} {final}",
                (
                    sql.SQL("DROP INDEX {}").format(target),
                    sql.SQL("ALTER INDEX {} RENAME TO {}").format(temporary_id, sql.Identifier(final)),
                    comment_sql("index", target, marker),
                ),
                takes_exclusive_lock=True,
            ),
        ]
    return []


def _converge_view(view: MaterializedView, observed: Observed, reasons: list[str]) -> list[Step]:
    # New and changed indexes are built before old ones are dropped: the view is never left unindexed.
    steps: list[Step] = []
    table = relation_id(view.schema, view.name)
    for index in view.indexes:
        name = view.index_name(index)
        existing = observed.indexes.get(name)
        if existing is not None and existing.marker is None:
            raise UnmanagedObjectError(_not_ours(f"index {view.schema}.{name}", None))
        steps += _index_steps(view, index, table, view.schema, existing, reasons, "index")
    wanted = {view.index_name(i) for i in view.indexes}
    for name, state in sorted(observed.indexes.items()):
        if name not in wanted and state.marker is not None and state.marker.owner == view.owner:
            reasons.append(f"index {name} is no longer in the spec")
            steps.append(
                Step(
                    f"drop index {name} (CONCURRENTLY)",
                    (sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(relation_id(view.schema, name)),),
                    transactional=False,
                )
            )
    grant_statements: list[Statement] = []
    wanted_grants = {g.role: frozenset(g.privileges) for g in view.grants}
    for role, privileges in sorted(wanted_grants.items()):
        missing = privileges - observed.grants.get(role, frozenset())
        if missing:
            grant_statements.append(grant_sql(table, role, missing))
    for role, privileges in sorted(observed.grants.items()):
        extra = privileges - wanted_grants.get(role, frozenset())
        if extra and extra <= _PRIVILEGES.keys():
            grant_statements.append(grant_sql(table, role, extra, revoke=True))
    if grant_statements:
        reasons.append("grants differ from the spec")
        steps.append(Step(f"converge grants on {view.relation}", tuple(grant_statements)))
    return steps


def _converge_supporting(view: MaterializedView, observed: Observed, reasons: list[str]) -> list[Step]:
    steps: list[Step] = []
    owned = {(s.schema, s.name): s for s in observed.owned_supporting}
    for index in view.supporting_indexes:
        name = view.index_name(index)
        table = relation_id(index.table_schema, index.table)
        existing = owned.get((index.table_schema, name))
        steps += _index_steps(view, index, table, index.table_schema, existing, reasons, "supporting index")
    wanted = {(i.table_schema, view.index_name(i)) for i in view.supporting_indexes}
    for state in observed.owned_supporting:
        if (state.schema, state.name) not in wanted:
            reasons.append(f"supporting index {state.schema}.{state.name} is no longer in the spec")
            steps.append(
                Step(
                    f"drop supporting index {state.schema}.{state.name} (CONCURRENTLY)",
                    (sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(relation_id(state.schema, state.name)),),
                    transactional=False,
                )
            )
    return steps


def build_delete_plan(view: MaterializedView, observed: Observed) -> Plan:
    """Retain leaves the view's data as it is; Delete drops the view and the supporting indexes it created.
    Change capture goes either way: left behind, its triggers would fill a log nobody reads."""
    uncapture = _drop_capture_steps(view, observed, observed.capture) if observed.capture is not None else []
    if _live_is_ours(view, observed):  # it reads the log and the table: it goes first, whatever the policy
        dropping = live.drop_statements(view)
        if not all(_live_part_is_ours(view, observed, part) for part in observed.live_parts):
            dropping = dropping[:1]  # a function or table of someone else's holds a name: not ours to drop
        uncapture = [Step(f"drop the live view {view.schema}.{live.name(view)}", tuple(dropping)), *uncapture]
    if view.deletion_policy == "Retain":
        reasons = ["deletionPolicy is Retain: the view and its indexes stay"]
        return Plan(view, tuple(uncapture), tuple(reasons + (["change capture is removed"] if uncapture else [])))
    steps: list[Step] = list(uncapture)
    relation = observed.relation
    if relation is not None:
        if relation.relkind not in RELATION_KEYWORDS or not _is_ours(view, observed, relation.marker, relation.owner):
            raise UnmanagedObjectError(_not_ours(f"relation {view.relation}", relation.marker, relation.owner))
        others = _dependents_besides_live(view, observed)
        if others:
            names = ", ".join(f"{d.schema}.{d.name}" for d in others)
            raise DependentObjectsError(
                f"{view.relation} is not dropped because other views depend on it: {names}; "
                "drop them first (the engine never uses CASCADE)"
            )
        steps.append(
            Step(
                f"drop {view.relation}",
                (
                    sql.SQL("DROP {} {}").format(
                        RELATION_KEYWORDS[relation.relkind], relation_id(view.schema, view.name)
                    ),
                ),
                takes_exclusive_lock=True,
            )
        )
    steps += [
        drop_leftover_step(leftover.schema, leftover.name, leftover.relkind) for leftover in _leftovers(view, observed)
    ]
    for state in observed.owned_supporting:
        steps.append(
            Step(
                f"drop supporting index {state.schema}.{state.name} (CONCURRENTLY)",
                (sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(relation_id(state.schema, state.name)),),
                transactional=False,
            )
        )
    return Plan(view, tuple(steps), ("deletionPolicy is Delete",) if steps else ("nothing to drop",))
