"""Plan: a pure function from (spec, observed catalog) to ordered steps of SQL.

No I/O happens here, so every decision — create, converge indexes, swap on a
changed query or drifted source, refuse to touch what is not ours — can be
tested without a database, and ``matview plan`` can show exactly what ``apply``
would run. Names go through ``sql.Identifier``; the user's query and predicates
only through ``sqltext.embed``.

This module orders the plan; its pieces live beside it: ``statements`` (steps, names,
shared statements, ownership), ``checks`` (refusals with the field to fix),
``converge`` (indexes, capture, the live view) and ``rebuild`` (build, swap, refresh).
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from matview.api.spec import MaterializedView
from matview.errors import DependentObjectsError, FieldError, SpecError, UnmanagedObjectError
from matview.plan import capture
from matview.plan.checks import (
    check_decoding,
    check_incremental,
    check_names_free,
    check_partition_sources,
    check_supporting,
    partition_column_errors,
    source_drift,
)
from matview.plan.converge import (
    converge_capture,
    converge_live,
    converge_supporting,
    converge_view,
    dependents_besides_live,
    drop_capture_steps,
    drop_decoding_steps,
    drop_live_step,
    leftovers,
    live_is_ours,
)
from matview.plan.observed import Observed
from matview.plan.rebuild import create_step, drop_leftover_step, swap_steps
from matview.plan.statements import RELATION_KEYWORDS, Plan, Step, is_ours, not_ours, relation_id


def reading_warnings(view: MaterializedView) -> list[str]:
    """What `matview plan` tells about how applications can read the view (not a reason to change anything)."""
    if any(index.unique and index.where is None for index in view.indexes):
        return []
    return [
        "no unique index without a WHERE: keyset pages (matview.client.page, matview page) need one that their "
        "order covers; declare `indexes: [{columns: [<key>], unique: true}]`"
    ]


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
        errors += partition_column_errors(view, dict(query_columns), observed.partition_key)
        duplicates = sorted({c for c, _ in query_columns if [n for n, _ in query_columns].count(c) > 1})
        if duplicates:
            errors.append(FieldError("spec.query", "result has duplicate column names: " + ", ".join(duplicates)))
    for i, grant in enumerate(view.grants):
        if grant.role != "PUBLIC" and grant.role not in observed.roles:
            errors.append(FieldError(f"spec.grants[{i}].role", f"role {grant.role!r} does not exist"))
    errors += check_supporting(view, observed)
    errors += check_incremental(view, observed)
    errors += check_decoding(view, observed)
    errors += check_partition_sources(view, observed)
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
        or not is_ours(view, observed, relation.marker, relation.owner)
        or relation.marker is None
        or relation.marker.kind != "view"
    ):
        raise UnmanagedObjectError(not_ours(f"relation {view.relation}", relation.marker, relation.owner))
    check_names_free(view, observed)

    steps: list[Step] = []
    reasons: list[str] = []
    warnings: list[str] = [
        f"spec.searchPath: roles other than its owner may CREATE in schema {schema!r} ({', '.join(roles)}): "
        "a function or operator planted there can run as the view's role; list only schemas nobody else writes"
        for schema, roles in sorted(observed.search_path_creators.items())
    ]
    steps += [
        drop_leftover_step(leftover.schema, leftover.name, leftover.relkind) for leftover in leftovers(view, observed)
    ]
    # Capture first: from the moment the data is built, every write to a source is in the change log.
    steps += converge_capture(view, observed, reasons)

    if relation is None:
        reasons.append(f"{view.relation} does not exist")
        steps.append(create_step(view))
    else:
        drift = source_drift(relation.columns, query_columns)
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
                dependents_besides_live(view, observed),
                old_indexes=observed.indexes,
                old_relkind=relation.relkind,
            )
        else:
            steps += converge_view(view, observed, reasons)
    steps += converge_supporting(view, observed, reasons)
    steps = converge_live(view, observed, steps, reasons)
    incremental_query = None
    if view.incremental is not None and observed.key_catalog is not None:
        incremental_query = capture.key_filtered_query(view, observed.key_catalog).query  # checked above: it succeeds
    return Plan(view, tuple(steps), tuple(reasons), tuple(warnings), incremental_query)


def build_delete_plan(view: MaterializedView, observed: Observed) -> Plan:
    """Retain leaves the view's data as it is; Delete drops the view and the supporting indexes it created.
    Change capture goes either way: left behind, its triggers would fill a log nobody reads."""
    uncapture = drop_capture_steps(view, observed, observed.capture) if observed.capture is not None else []
    uncapture += drop_decoding_steps(view, observed)
    if live_is_ours(view, observed):  # it reads the log and the table: it goes first, whatever the policy
        uncapture = [drop_live_step(view, observed), *uncapture]
    if view.deletion_policy == "Retain":
        reasons = ["deletionPolicy is Retain: the view and its indexes stay"]
        return Plan(view, tuple(uncapture), tuple(reasons + (["change capture is removed"] if uncapture else [])))
    steps: list[Step] = list(uncapture)
    relation = observed.relation
    if relation is not None:
        if relation.relkind not in RELATION_KEYWORDS or not is_ours(view, observed, relation.marker, relation.owner):
            raise UnmanagedObjectError(not_ours(f"relation {view.relation}", relation.marker, relation.owner))
        others = dependents_besides_live(view, observed)
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
        drop_leftover_step(leftover.schema, leftover.name, leftover.relkind) for leftover in leftovers(view, observed)
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
