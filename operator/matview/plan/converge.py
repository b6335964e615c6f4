"""Converging what exists to what the spec wants, piece by piece: the view's indexes, the supporting
indexes, change capture and the live view. Each returns the steps (and reasons) for its piece; the
planner orders them."""

from __future__ import annotations

from dataclasses import replace

from psycopg import sql

from matview.api.spec import IndexSpec, MaterializedView
from matview.errors import UnmanagedObjectError
from matview.plan import capture, decoding, live
from matview.plan.marker import Marker
from matview.plan.observed import DependentView, IndexState, LivePart, Observed, RelationState
from matview.plan.rebuild import grant_statements
from matview.plan.statements import (
    PRIVILEGES,
    Statement,
    Step,
    comment_sql,
    create_index_sql,
    grant_sql,
    index_marker,
    is_ours,
    not_ours,
    rebuild_index_name,
    relation_id,
    trusted_owners,
)


def converge_capture(view: MaterializedView, observed: Observed, reasons: list[str]) -> list[Step]:
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
        removal = drop_capture_steps(view, observed, state) + drop_decoding_steps(view, observed)
        if removal:
            reasons.append("change capture is no longer declared")
        return removal
    steps: list[Step] = []
    wanted = {source.relation: source for source in view.incremental.sources}
    log_label = f"relation {view.schema}.{capture.changes_name(view)}"
    if state.changes_exists and not is_ours(view, observed, state.changes, state.changes_owner):
        raise UnmanagedObjectError(not_ours(log_label, state.changes, state.changes_owner))
    for name, function in sorted(state.functions.items()):
        if not is_ours(view, observed, function.marker, function.owner):
            raise UnmanagedObjectError(not_ours(f"function {view.schema}.{name}()", function.marker, function.owner))
    operator = observed.current_user
    log_current = (
        state.changes_exists
        and state.changes is not None
        and state.changes.digest == capture.capture_digest(view)
        and state.changes_owner == operator
        and not state.changes_has_triggers
        and state.functions_intact(view, operator)
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
        if state.changes_exists or state.functions or existing:
            steps += drop_capture_steps(view, observed, state)
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
    steps += converge_decoding(view, observed, reasons)
    if decoding.uses_decoding(view):
        wanted = {}  # no trigger anywhere: the ones found are dropped below
    for relation in sorted(wanted):
        found = existing.get(relation, {})
        calls = capture.trigger_calls(view, relation)
        if set(found) == set(calls) and all(t.enabled and t.function == calls[n] for n, t in found.items()):
            continue
        label = f"{relation[0]}.{relation[1]}"
        install += capture.drop_trigger_statements(*relation, list(found))
        install += capture.create_trigger_statements(view, *relation)
        if log_current:
            repaired.append(label)
            reasons.append(f"capture triggers on {label} are missing, not enabled ALWAYS or call the wrong function")
    if repaired or (install and observed.relation is not None) or (not log_current and observed.relation is not None):
        why = "capture was missing on " + ", ".join(repaired) if repaired else "change capture was installed"
        install.append(capture.request_full_rebuild(view, why))
    if install:
        steps.append(Step(f"install change capture on {len(install)} trigger statement(s)", tuple(install)))
    for relation, found in sorted(existing.items()):
        if relation not in wanted and found:
            reasons.append(
                f"{relation[0]}.{relation[1]} is no longer a source"
                if not decoding.uses_decoding(view)
                else f"capture triggers on {relation[0]}.{relation[1]} are replaced by logical decoding"
            )
            steps.append(
                Step(
                    f"drop capture triggers on {relation[0]}.{relation[1]}",
                    tuple(capture.drop_trigger_statements(*relation, list(found))),
                )
            )
    return steps


def publication_is_ours(view: MaterializedView, observed: Observed) -> bool:
    found = observed.decoding
    return (
        found is not None
        and found.publication_exists
        and found.publication_marker is not None
        and found.publication_marker.kind == "publication"
        and is_ours(view, observed, found.publication_marker, found.publication_owner)
    )


def check_slot_is_ours(view: MaterializedView, observed: Observed) -> None:
    """A slot with our name that is not a pgoutput slot of this database was made by someone else: it is
    never dropped or read (a slot has no owner to prove more)."""
    found = observed.decoding
    if found is not None and found.slot_exists and not found.slot_is_ours:
        raise UnmanagedObjectError(
            f"replication slot {decoding.slot_name(view)} exists with plugin {found.slot_plugin!r}"
            + ("" if found.slot_database_ours else " in another database")
            + ": it is not managed by this resource; drop it or rename it"
        )


def converge_decoding(
    view: MaterializedView,
    observed: Observed,
    reasons: list[str],
    force_new_slot: bool = False,
    built: bool | None = None,
    why: str = "",
) -> list[Step]:
    """The publication of the sources and the replication slot of a LogicalDecoding view, or their removal
    when the view captures otherwise. A publication made again, or a slot made again (missing, or
    invalidated by max_slot_wal_keep_size), missed changes: a full rebuild is requested (the caller places
    these steps after the change log's). A drain that could not read the slot forces a new one (built: the
    view's data exists; why: the rebuild's reason)."""
    found = observed.decoding
    if found is None:
        return []
    if not decoding.uses_decoding(view):
        removal = drop_decoding_steps(view, observed)
        if removal:
            reasons.append("logical decoding is no longer the capture method")
        return removal
    assert view.incremental is not None
    steps: list[Step] = []
    wanted_tables = frozenset(s.relation for s in view.incremental.sources)
    name = decoding.publication_name(view)
    publication_current = (
        publication_is_ours(view, observed)
        and found.publication_marker is not None
        and found.publication_marker.digest == decoding.decoding_digest(view)
        and found.publication_tables == wanted_tables
        and found.publication_publishes_all
    )
    if found.publication_exists and not publication_is_ours(view, observed):
        raise UnmanagedObjectError(not_ours(f"publication {name}", found.publication_marker, found.publication_owner))
    check_slot_is_ours(view, observed)
    new_slot = force_new_slot or not found.slot_exists or found.slot_lost or not publication_current
    if not publication_current:
        reasons.append(
            f"publication {name} "
            + (
                "publishes other tables or operations than the sources"
                if found.publication_exists
                else "does not exist"
            )
        )
        made: list[Statement] = [decoding.drop_publication_statement(view)] if found.publication_exists else []
        made += decoding.create_publication_statements(view)
        steps.append(Step(f"publish the sources of {view.relation} ({name})", tuple(made)))
    if new_slot:
        slot = decoding.slot_name(view)
        if found.slot_lost:
            reasons.append(f"replication slot {slot} was invalidated (max_slot_wal_keep_size): its changes are lost")
        elif not found.slot_exists:
            reasons.append(f"replication slot {slot} does not exist")
        made = [decoding.drop_slot_statement(view)] if found.slot_exists else []
        # Not in a transaction: a logical slot is made outside one (it waits for running writers to finish).
        steps.append(
            Step(
                f"create the logical replication slot {slot}",
                (*made, decoding.create_slot_statement(view)),
                transactional=False,
            )
        )
        if observed.relation is not None if built is None else built:
            why = why or f"replication slot {slot} was made again: changes before it are not in it"
            steps.append(Step("request a full rebuild", (capture.request_full_rebuild(view, why),)))
    return steps


def drop_decoding_steps(view: MaterializedView, observed: Observed) -> list[Step]:
    """Drop the slot and the publication, when they exist and are ours."""
    found = observed.decoding
    if found is None:
        return []
    statements: list[Statement] = []
    if found.slot_is_ours:
        statements.append(decoding.drop_slot_statement(view))
    if publication_is_ours(view, observed):
        statements.append(decoding.drop_publication_statement(view))
    if not statements:
        return []
    return [Step(f"drop the logical decoding capture of {view.relation}", tuple(statements), transactional=False)]


def _live_and_ours(view: MaterializedView, observed: Observed, marker: Marker | None, owner: str) -> bool:
    return marker is not None and marker.kind == "live" and is_ours(view, observed, marker, owner)


def live_is_ours(view: MaterializedView, observed: Observed) -> bool:
    found = observed.live
    return found is not None and found.relkind == "v" and _live_and_ours(view, observed, found.marker, found.owner)


def dependents_besides_live(view: MaterializedView, observed: Observed) -> list[DependentView]:
    """The views reading the relation, but our live view, which the plan drops and makes again itself."""
    live_oid = observed.live.oid if observed.live is not None and live_is_ours(view, observed) else None
    return [d for d in observed.dependents if d.oid != live_oid]


def live_part_is_ours(view: MaterializedView, observed: Observed, part: LivePart) -> bool:
    return _live_and_ours(view, observed, part.marker, part.owner)


def drop_live_step(view: MaterializedView, observed: Observed, if_exists: bool = False) -> Step:
    """Drop the live view, then its function and row shape, unless one of those names is held by something
    not ours (then only the view: the other is not ours to drop)."""
    dropping = live.drop_statements(view, if_exists=if_exists)
    if not all(live_part_is_ours(view, observed, part) for part in observed.live_parts):
        dropping = dropping[:1]
    return Step(f"drop the live view {view.schema}.{live.name(view)}", tuple(dropping))


def converge_live(view: MaterializedView, observed: Observed, steps: list[Step], reasons: list[str]) -> list[Step]:
    """Keep the live view (plan/live.py) in step: it reads the table and the change log, so anything that
    replaces either (a swap, re-installed capture) or changes the query drops it first and makes it again
    last; a live view no longer declared is dropped, with its function and row shape."""
    found = observed.live
    ours = live_is_ours(view, observed)
    wanted = live.wanted(view)
    foreign_parts = [part for part in observed.live_parts if not live_part_is_ours(view, observed, part)]
    if wanted and foreign_parts:
        part = foreign_parts[0]
        raise UnmanagedObjectError(not_ours(part.label, part.marker, part.owner))
    if found is not None and not ours:
        if wanted:
            raise UnmanagedObjectError(not_ours(f"relation {view.schema}.{found.name}", found.marker, found.owner))
        return steps  # somebody's own view with that name: not ours to touch
    current = ours and found is not None and found.marker is not None and found.marker.digest == live.digest(view)
    touched = any(step.makes_data_live or step.drops_change_log for step in steps)
    drop = ours and (not wanted or not current or touched)
    create = wanted and (not ours or drop)
    if drop or (not wanted and observed.live_parts and not foreign_parts):
        steps = [drop_live_step(view, observed, if_exists=not ours), *steps]
        if not wanted:
            reasons.append("the live view is no longer declared")
    if create and observed.key_catalog is not None and observed.query_columns is not None:
        if not ours:
            reasons.append(f"the live view {view.schema}.{live.name(view)} does not exist")
        elif not current:
            reasons.append("the live view was made from another definition")
        columns = tuple(column for column, _ in observed.query_columns)
        statements: list[Statement] = [*live.create_statements(view, observed.key_catalog, columns)]
        statements += grant_statements(view, live.identifier(view))
        steps = [
            *steps,
            Step(f"create the live view {view.schema}.{live.name(view)}", tuple(statements), runs_query=True),
        ]
    return steps


def leftovers(view: MaterializedView, observed: Observed) -> list[RelationState]:
    """Copies a crashed swap left (staging, retired): dropped, but only when they are provably ours."""
    return [found for found in observed.staging if found.owner in trusted_owners(view, observed)]


def drop_capture_steps(view: MaterializedView, observed: Observed, state: capture.CaptureState) -> list[Step]:
    statements: list[Statement] = []
    for (schema, table), found in sorted(state.triggers.items()):
        statements += capture.drop_trigger_statements(schema, table, list(found))
    if state.changes_exists and not is_ours(view, observed, state.changes, state.changes_owner):
        state = replace(state, changes_exists=False)  # never ours to drop
    state = replace(
        state,
        functions={name: f for name, f in state.functions.items() if is_ours(view, observed, f.marker, f.owner)},
    )
    statements += capture.drop_log_statements(view, state)
    if not statements:
        return []
    return [
        Step(f"remove the change capture of {view.relation}", tuple(statements), drops_change_log=state.changes_exists)
    ]


def _drop_index(concurrently: bool) -> sql.SQL:
    """DROP INDEX, CONCURRENTLY unless on a partitioned table (which PostgreSQL cannot drop from that way)."""
    return sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}") if concurrently else sql.SQL("DROP INDEX IF EXISTS {}")


def index_steps(
    view: MaterializedView,
    index: IndexSpec,
    table: sql.Identifier,
    schema: str,
    existing: IndexState | None,
    reasons: list[str],
    label: str,
    concurrently: bool = True,
) -> list[Step]:
    """Create, repair or replace one index. ``concurrently`` False (a partitioned table, which PostgreSQL
    cannot index CONCURRENTLY): each build is a transaction of its own, in which writes wait and reads go on."""
    final = view.index_name(index)
    marker = index_marker(view, index)
    target = relation_id(schema, final)
    create = create_index_sql(view, index, final, table, concurrently=concurrently)
    drop = _drop_index(concurrently)
    drop_final = drop.format(target)
    how = "(CONCURRENTLY)" if concurrently else "(writes wait)"
    if existing is None:
        reasons.append(f"{label} {final} is missing")
        return [
            Step(f"create {label} {final} {how}", (create,), transactional=not concurrently, cleanup=(drop_final,)),
            Step(f"mark {label} {final}", (comment_sql("index", target, marker),)),
        ]
    if not existing.valid:
        reasons.append(f"{label} {final} is INVALID (an earlier build failed)")
        return [
            Step(f"drop invalid {label} {final}", (drop_final,), transactional=not concurrently),
            Step(f"create {label} {final} {how}", (create,), transactional=not concurrently, cleanup=(drop_final,)),
            Step(f"mark {label} {final}", (comment_sql("index", target, marker),)),
        ]
    if existing.marker is not None and existing.marker.digest != marker.digest:
        reasons.append(f"{label} {final} definition changed")
        temporary = rebuild_index_name(final)
        temporary_id = relation_id(schema, temporary)
        return [
            Step(
                f"build the changed {label} {final} beside the old one {how}",
                (create_index_sql(view, index, temporary, table, concurrently=concurrently),),
                transactional=not concurrently,
                cleanup=(drop.format(temporary_id),),
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


def converge_view(view: MaterializedView, observed: Observed, reasons: list[str]) -> list[Step]:
    # New and changed indexes are built before old ones are dropped: the view is never left unindexed.
    steps: list[Step] = []
    table = relation_id(view.schema, view.name)
    for index in view.indexes:
        name = view.index_name(index)
        existing = observed.indexes.get(name)
        if existing is not None and existing.marker is None:
            raise UnmanagedObjectError(not_ours(f"index {view.schema}.{name}", None))
        steps += index_steps(view, index, table, view.schema, existing, reasons, "index", view.relkind != "p")
    wanted = {view.index_name(i) for i in view.indexes}
    for name, state in sorted(observed.indexes.items()):
        if name not in wanted and state.marker is not None and state.marker.owner == view.owner:
            reasons.append(f"index {name} is no longer in the spec")
            concurrently = view.relkind != "p"
            steps.append(
                Step(
                    f"drop index {name}" + (" (CONCURRENTLY)" if concurrently else ""),
                    (_drop_index(concurrently).format(relation_id(view.schema, name)),),
                    transactional=not concurrently,
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
        if extra and extra <= PRIVILEGES.keys():
            grant_statements.append(grant_sql(table, role, extra, revoke=True))
    if grant_statements:
        reasons.append("grants differ from the spec")
        steps.append(Step(f"converge grants on {view.relation}", tuple(grant_statements)))
    return steps


def converge_supporting(view: MaterializedView, observed: Observed, reasons: list[str]) -> list[Step]:
    steps: list[Step] = []
    owned = {(s.schema, s.name): s for s in observed.owned_supporting}
    for index in view.supporting_indexes:
        name = view.index_name(index)
        table = relation_id(index.table_schema, index.table)
        existing = owned.get((index.table_schema, name))
        steps += index_steps(view, index, table, index.table_schema, existing, reasons, "supporting index")
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
