"""Steps that make data: the first build, build-and-swap (with the views that depend on the relation
re-created), REFRESH in place, an incremental apply, and recording the refresh state.

The refresh engine runs these too (matview.refresh), so they take what they need as arguments rather
than an observed catalog.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from psycopg import sql

from matview.api import sqltext
from matview.api.spec import MaterializedView
from matview.errors import DependentObjectsError
from matview.plan import capture, decoding, partitions, versions
from matview.plan.capture import EVERY_ROW
from matview.plan.marker import Marker
from matview.plan.observed import DependentView
from matview.plan.statements import (
    PRIVILEGES,
    RELATION_KEYWORDS,
    Statement,
    Step,
    StepItem,
    comment_sql,
    create_index_sql,
    grant_sql,
    index_marker,
    relation_id,
    retired_index_name,
    retired_name,
    staging_index_name,
    staging_name,
    view_markers,
)

#: The options of a dependent view that a swap carries over (read from the catalog), and their values.
VIEW_OPTIONS = {
    "security_barrier": sql.SQL("security_barrier"),
    "security_invoker": sql.SQL("security_invoker"),
    "check_option": sql.SQL("check_option"),
}
VIEW_OPTION_VALUES = {
    "true": sql.SQL("true"),
    "false": sql.SQL("false"),
    "on": sql.SQL("on"),
    "off": sql.SQL("off"),
    "local": sql.SQL("local"),
    "cascaded": sql.SQL("cascaded"),
}


def build_statements(
    view: MaterializedView,
    name: str,
    index_name: dict[str, str],
    marker: Marker,
) -> list[StepItem]:
    target = relation_id(view.schema, name)
    statements: list[StepItem]
    if view.partitioning is not None:
        statements = list(partitions.build_statements(view, name, sqltext.embed(view.query)))
    else:
        statements = [
            sql.SQL("CREATE {} {} AS {} WITH DATA").format(
                RELATION_KEYWORDS[view.relkind], target, sqltext.embed(view.query)
            ),
        ]
    for index in view.indexes:
        final = view.index_name(index)
        statements.append(create_index_sql(view, index, index_name[final], target, concurrently=False))
        statements.append(comment_sql("index", relation_id(view.schema, index_name[final]), index_marker(view, index)))
    if view.partitioning is not None:
        statements.append(
            partitions.renames(
                view,
                f"name the indexes of {view.schema}.{name}'s partitions after its indexes",
                [({name: name}, {temporary: temporary for temporary in index_name.values()})],
            )
        )
    statements.append(comment_sql("view", target, marker, view.relkind))
    # A new relation has no statistics; without them the first queries on it plan blind.
    statements.append(sql.SQL("ANALYZE {}").format(target))
    return statements


def grant_statements(view: MaterializedView, target: sql.Identifier) -> list[Statement]:
    return [grant_sql(target, grant.role, grant.privileges) for grant in view.grants]


def create_step(view: MaterializedView) -> Step:
    names = {view.index_name(i): view.index_name(i) for i in view.indexes}
    statements = build_statements(view, view.name, names, view_markers(view))
    statements += grant_statements(view, relation_id(view.schema, view.name))
    statements += versions.bump_statements(view, "Create")
    return Step(
        f"create {view.relation} with {len(view.indexes)} index(es)",
        tuple(statements),
        makes_data_live=True,
        runs_query=True,
        # Capture is installed first (so no write is missed); if the first build fails, nothing of it may stay
        # on a source table: triggers there would make every writer pay for a view that does not exist.
        cleanup=(*capture.uninstall_statements(view), *decoding.uninstall_statements(view))
        if view.incremental is not None
        else (),
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
    new_kind = RELATION_KEYWORDS[view.relkind]
    old_kind = RELATION_KEYWORDS[old_relkind or view.relkind]
    index_names = {view.index_name(i): staging_index_name(view.index_name(i)) for i in view.indexes}
    claim: list[StepItem] = list(capture.claim_for_swap(view)) if view.incremental is not None else []
    build = Step(
        f"build the new copy {view.schema}.{staging} with its indexes (readers keep the old one)",
        tuple(
            claim + build_statements(view, staging, index_names, Marker(view.owner, "staging", view.definition_digest))
        ),
        cleanup=(sql.SQL("DROP {} IF EXISTS {}").format(new_kind, relation_id(view.schema, staging)),),
        runs_query=True,
        repeatable_read=bool(claim),
    )
    target = relation_id(view.schema, view.name)
    swap: list[StepItem] = [
        sql.SQL("DROP VIEW {}").format(relation_id(d.schema, d.name))
        for d in sorted(dependents, key=lambda d: -d.depth)
    ]
    if view.partitioning is not None or old_relkind == "p":
        old_names = {name: retired_index_name(name) for name in old_indexes}
        swap.append(
            partitions.renames(
                view,
                f"name the partitions of {view.schema}.{staging} and of the copy it replaces after their new parents",
                [({view.name: retired}, old_names), ({staging: view.name}, {v: k for k, v in index_names.items()})],
            )
        )
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
            old_relkind or view.relkind,
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
    swap.append(comment_sql("view", target, replace(view_markers(view), state=state or {}), view.relkind))
    if view.incremental is not None:
        swap.append(capture.swap_committed(view))
    swap += grant_statements(view, target)
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
        (
            sql.SQL("REFRESH MATERIALIZED VIEW {}{}").format(concurrently, target),
            *versions.bump_statements(view, mode, as_query_role=False),
        ),
        takes_exclusive_lock=True,
        makes_data_live=True,
        restricted_user_sql=True,
    )


def record_state_statement(view: MaterializedView, marker: Marker) -> Statement:
    """The view's marker with its refresh state, written (a refresh ends its own transaction with it)."""
    return comment_sql("view", relation_id(view.schema, view.name), marker, view.relkind)


def record_state_step(view: MaterializedView, marker: Marker) -> Step:
    """Write the view's marker with its refresh state in a step of its own (after a verification, a build)."""
    return Step(
        f"record the refresh state of {view.relation}",
        (record_state_statement(view, marker),),
    )


def incremental_step(
    view: MaterializedView, filtered_query: sqltext.CheckedSQL, keys: int, keep: sql.Composable = EVERY_ROW
) -> Step:
    """Apply the changed keys in one transaction: readers see all of it at commit, or none of it. Only rows
    ``keep`` holds for are inserted (a partitioned view's retention window: a retired row never comes back)."""
    return Step(
        f"apply {keys} changed key(s) to {view.relation}",
        (
            *capture.incremental_statements(view, filtered_query, keep),
            *versions.bump_statements(view, "Incremental", True),
        ),
        makes_data_live=True,
        runs_query=True,
        repeatable_read=True,
    )


def _recreate_dependent(dependent: DependentView) -> list[Statement]:
    target = relation_id(dependent.schema, dependent.name)
    options = []
    for option in dependent.options:
        key, _, value = option.partition("=")
        if key not in VIEW_OPTIONS or value.lower() not in VIEW_OPTION_VALUES:
            raise DependentObjectsError(
                f"dependent view {dependent.schema}.{dependent.name} has option {option!r}, "
                "which the swap cannot carry over"
            )
        options.append(sql.SQL("{} = {}").format(VIEW_OPTIONS[key], VIEW_OPTION_VALUES[value.lower()]))
    with_options = sql.SQL(" WITH ({})").format(sql.SQL(", ").join(options)) if options else sql.SQL("")
    definition = sqltext.check_view_definition(dependent.definition)
    statements: list[Statement] = [
        sql.SQL("CREATE VIEW {}{} AS {}").format(target, with_options, sqltext.embed(definition)),
        sql.SQL("ALTER VIEW {} OWNER TO {}").format(target, sql.Identifier(dependent.owner)),
    ]
    for grantee, privilege, grantable in dependent.acl:
        if privilege not in PRIVILEGES:
            continue
        statement = grant_sql(target, grantee, [privilege])
        statements.append(statement + sql.SQL(" WITH GRANT OPTION") if grantable else statement)
    if dependent.comment is not None:
        statements.append(sql.SQL("COMMENT ON VIEW {} IS {}").format(target, sql.Literal(dependent.comment)))
    return statements
