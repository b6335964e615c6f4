"""The planner is pure: given a spec and an observed catalog it returns exact SQL. Golden tests pin it."""

from __future__ import annotations

import pytest

from matview.api.spec import MaterializedView
from matview.errors import DependentObjectsError, SpecError, UnmanagedObjectError
from matview.plan import checks, versions
from matview.plan.engine import render
from matview.plan.marker import Marker
from matview.plan.observed import DependentView, IndexState, Observed, OwnedSequence, RelationState, TableState
from matview.plan.planner import build_delete_plan, build_plan
from tests.helpers import view

COLUMNS = (("driver_id", "integer"), ("origin_tag", "text"), ("only_pending", "boolean"))


def matrix(**spec: object) -> MaterializedView:
    base: dict[str, object] = {
        "schema": "ops",
        "query": "SELECT driver_id, origin_tag, only_pending FROM ops.src",
        "indexes": [
            {"columns": ["driver_id"], "unique": True},
            {"columns": ["origin_tag"], "where": "only_pending", "name": "pending_by_tag"},
        ],
        "grants": [{"role": "app"}],
    }
    base.update(spec)
    return view("driver-matrix", "ops", **base)


def marker(v: MaterializedView, kind: str, digest: str) -> str:
    return Marker(v.owner, kind, digest).to_comment()  # type: ignore[arg-type]


def fresh(v: MaterializedView) -> Observed:
    return Observed(current_user="owner", schema_exists=True, query_columns=COLUMNS, roles=frozenset({"app"}))


def existing(v: MaterializedView, **changes: object) -> Observed:
    observed = fresh(v)
    observed.relation = RelationState(
        100, "ops", v.name, "m", Marker(v.owner, "view", v.query.digest), True, COLUMNS, "owner"
    )
    for index in v.indexes:
        name = v.index_name(index)
        observed.indexes[name] = IndexState("ops", name, 100, Marker(v.owner, "index", index.definition_digest), True)
    observed.grants = {"app": frozenset({"SELECT"})}
    for key, value in changes.items():
        setattr(observed, key, value)
    return observed


def test_create_is_one_transaction_with_indexes_marker_and_grants() -> None:
    v = matrix()
    plan = build_plan(v, fresh(v))
    assert [s.transactional for s in plan.steps] == [True]
    unique = v.index_name(v.indexes[0])
    assert render(plan) == [
        'CREATE MATERIALIZED VIEW "ops"."driver_matrix" AS SELECT driver_id, origin_tag, only_pending FROM ops.src '
        "WITH DATA",
        f'CREATE UNIQUE INDEX "{unique}" ON "ops"."driver_matrix" USING btree ("driver_id")',
        f'COMMENT ON INDEX "ops"."{unique}" IS \'{marker(v, "index", v.indexes[0].definition_digest)}\'',
        'CREATE INDEX "pending_by_tag" ON "ops"."driver_matrix" USING btree ("origin_tag") WHERE only_pending',
        f'COMMENT ON INDEX "ops"."pending_by_tag" IS \'{marker(v, "index", v.indexes[1].definition_digest)}\'',
        f'COMMENT ON MATERIALIZED VIEW "ops"."driver_matrix" IS \'{marker(v, "view", v.query.digest)}\'',
        'ANALYZE "ops"."driver_matrix"',
        'GRANT SELECT ON "ops"."driver_matrix" TO "app"',
        *(statement.as_string(None) for statement in versions.bump_statements(v, "Create")),
    ]
    bump = render(plan)[-1]
    assert 'INSERT INTO "ops"."matview_versions"' in bump and "pg_catalog.pg_notify('matview_changes'" in bump


def test_matching_state_gives_an_empty_plan() -> None:
    v = matrix()
    assert build_plan(v, existing(v)).empty


def test_missing_index_is_created_concurrently_then_marked() -> None:
    v = matrix()
    unique = v.index_name(v.indexes[0])
    observed = existing(v)
    del observed.indexes[unique]
    plan = build_plan(v, observed)
    assert [s.transactional for s in plan.steps] == [False, True]
    assert (
        render(plan)[0]
        == f'CREATE UNIQUE INDEX CONCURRENTLY "{unique}" ON "ops"."driver_matrix" USING btree ("driver_id")'
    )
    assert plan.reasons == (f"index {unique} is missing",)


def test_changed_named_index_is_built_beside_and_swapped() -> None:
    v = matrix()
    observed = existing(v)
    observed.indexes["pending_by_tag"] = IndexState("ops", "pending_by_tag", 100, Marker(v.owner, "index", "old"), True)
    plan = build_plan(v, observed)
    sql = render(plan)
    assert sql[0].startswith('CREATE INDEX CONCURRENTLY "pending_by_tag_new_')
    assert sql[1] == 'DROP INDEX "ops"."pending_by_tag"'
    assert sql[2].startswith('ALTER INDEX "ops"."pending_by_tag_new_') and sql[2].endswith('RENAME TO "pending_by_tag"')
    assert plan.steps[1].takes_exclusive_lock


def test_index_removed_from_spec_is_dropped_after_new_ones_are_built() -> None:
    v = matrix()
    observed = existing(v)
    observed.indexes["old_index"] = IndexState("ops", "old_index", 100, Marker(v.owner, "index", "x"), True)
    observed.indexes["dba_index"] = IndexState("ops", "dba_index", 100, None, True)
    unique = v.index_name(v.indexes[0])
    del observed.indexes[unique]
    sql = render(build_plan(v, observed))
    assert sql[0].startswith("CREATE UNIQUE INDEX CONCURRENTLY")
    assert sql[-1] == 'DROP INDEX CONCURRENTLY IF EXISTS "ops"."old_index"'
    assert not any("dba_index" in s for s in sql)


def test_grants_converge_both_ways() -> None:
    v = matrix()
    observed = existing(v, grants={"intruder": frozenset({"SELECT", "DELETE"})})
    assert render(build_plan(v, observed)) == [
        'GRANT SELECT ON "ops"."driver_matrix" TO "app"',
        'REVOKE DELETE, SELECT ON "ops"."driver_matrix" FROM "intruder"',
    ]


def test_query_change_swaps_and_recreates_dependents() -> None:
    v = matrix()
    observed = existing(v)
    assert observed.relation is not None
    observed.relation = RelationState(
        100, "ops", v.name, "m", Marker(v.owner, "view", "olddigest"), True, COLUMNS, "owner"
    )
    observed.dependents = [
        DependentView(
            200,
            "ops",
            "report",
            "v",
            1,
            " SELECT driver_matrix.driver_id FROM ops.driver_matrix;",
            (),
            "owner",
            "the report",
            (("app", "SELECT", False),),
            False,
        ),
        DependentView(
            201,
            "ops",
            "report2",
            "v",
            2,
            " SELECT report.driver_id FROM ops.report;",
            ("security_barrier=true",),
            "owner",
            None,
            (),
            False,
        ),
    ]
    plan = build_plan(v, observed)
    assert plan.reasons == ("query, searchPath, runAsRole or storage changed",)
    build, swap, drop_retired = plan.steps
    assert not build.takes_exclusive_lock and swap.takes_exclusive_lock
    sql = [s.as_string(None) for s in swap.statements]
    assert sql[:2] == ['DROP VIEW "ops"."report2"', 'DROP VIEW "ops"."report"']
    # Only renames while readers wait: the old copy is retired, and dropped in a step of its own.
    assert not any(s.startswith("DROP MATERIALIZED VIEW") for s in sql)
    assert 'ALTER MATERIALIZED VIEW "ops"."driver_matrix" RENAME TO "driver_matrix_mv_retired"' in sql
    assert 'ALTER INDEX "ops"."pending_by_tag" RENAME TO "pending_by_tag_old_' in " ".join(sql)
    assert [s.as_string(None) for s in drop_retired.statements] == [
        'DROP MATERIALIZED VIEW "ops"."driver_matrix_mv_retired"'
    ]
    assert 'CREATE VIEW "ops"."report" AS SELECT driver_matrix.driver_id FROM ops.driver_matrix' in sql
    assert (
        'CREATE VIEW "ops"."report2" WITH (security_barrier = true) AS SELECT report.driver_id FROM ops.report' in sql
    )
    assert 'GRANT SELECT ON "ops"."report" TO "app"' in sql
    assert 'COMMENT ON VIEW "ops"."report" IS \'the report\'' in sql
    assert sql.index('CREATE VIEW "ops"."report" AS SELECT driver_matrix.driver_id FROM ops.driver_matrix') < sql.index(
        'CREATE VIEW "ops"."report2" WITH (security_barrier = true) AS SELECT report.driver_id FROM ops.report'
    )


def test_source_drift_triggers_a_swap_with_the_reason() -> None:
    v = matrix()
    observed = existing(v)
    observed.query_columns = (*COLUMNS, ("lead_date", "date"))
    plan = build_plan(v, observed)
    assert plan.reasons == ("source columns changed: +lead_date date",)
    assert len(plan.steps) == 3


def test_dependent_materialized_view_blocks_the_swap() -> None:
    v = matrix()
    observed = existing(v)
    observed.relation = RelationState(100, "ops", v.name, "m", Marker(v.owner, "view", "old"), True, COLUMNS, "owner")
    observed.dependents = [DependentView(300, "ops", "rollup", "m", 1, "SELECT 1", (), "owner", None, (), False)]
    with pytest.raises(DependentObjectsError, match=r"ops\.rollup"):
        build_plan(v, observed)


@pytest.mark.parametrize("marker", [None, Marker("other/resource", "view", "x")])
def test_foreign_relation_is_refused(marker: Marker | None) -> None:
    v = matrix()
    observed = fresh(v)
    observed.relation = RelationState(100, "ops", v.name, "m", marker, True, COLUMNS, "owner")
    with pytest.raises(UnmanagedObjectError, match="not managed by this resource"):
        build_plan(v, observed)


def test_our_marker_on_a_relation_another_role_owns_proves_nothing() -> None:
    """A marker is a comment, which whoever owns an object can write: copied onto a look-alike it is refused,
    and the message names the owner."""
    v = matrix()
    observed = fresh(v)
    observed.relation = RelationState(
        100, "ops", v.name, "m", Marker(v.owner, "view", v.query.digest), True, COLUMNS, "mallory"
    )
    with pytest.raises(UnmanagedObjectError, match="owned by role 'mallory'"):
        build_plan(v, observed)
    with_role = matrix(runAsRole="mallory")
    observed = fresh(with_role)
    observed.relation = RelationState(
        100, "ops", v.name, "m", Marker(v.owner, "view", with_role.definition_digest), True, COLUMNS, "mallory"
    )
    assert build_plan(with_role, observed) is not None, "the declared runAsRole owns the views it builds"


def test_table_with_the_name_is_refused() -> None:
    v = matrix()
    observed = fresh(v)
    observed.relation = RelationState(100, "ops", v.name, "r", None, True, COLUMNS)
    with pytest.raises(UnmanagedObjectError):
        build_plan(v, observed)


def test_catalog_problems_name_fields() -> None:
    v = matrix(indexes=[{"columns": ["nope"]}], grants=[{"role": "ghost"}])
    observed = fresh(v)
    observed.schema_exists = False
    with pytest.raises(SpecError) as caught:
        build_plan(v, observed)
    paths = {e.path: e.message for e in caught.value.errors}
    assert "does not exist" in paths["spec.schema"]
    assert "not in the query's result" in paths["spec.indexes[0].columns[0]"]
    assert "does not exist" in paths["spec.grants[0].role"]


@pytest.mark.parametrize(
    ("relkind", "expected"),
    [("v", "is a view"), ("m", "is a materialized view"), ("p", "partitioned"), ("S", "not a table")],
)
def test_supporting_index_on_non_table_is_refused(relkind: str, expected: str) -> None:
    v = matrix(supportingIndexes=[{"table": "ops.src", "columns": ["driver_id"]}])
    observed = fresh(v)
    observed.tables[("ops", "src")] = TableState(5, relkind, ("driver_id",))
    with pytest.raises(SpecError) as caught:
        build_plan(v, observed)
    assert expected in caught.value.errors[0].message
    assert caught.value.errors[0].path == "spec.supportingIndexes[0].table"


def test_delete_plans() -> None:
    v = matrix(deletionPolicy="Delete")
    observed = existing(v)
    observed.owned_supporting = [IndexState("ops", "src_idx", 5, Marker(v.owner, "supporting", "d"), True)]
    assert render(build_delete_plan(v, observed)) == [
        'DROP MATERIALIZED VIEW "ops"."driver_matrix"',
        'DROP INDEX CONCURRENTLY IF EXISTS "ops"."src_idx"',
    ]
    assert build_delete_plan(matrix(), existing(matrix())).empty


def test_delete_refuses_when_views_depend() -> None:
    v = matrix(deletionPolicy="Delete")
    observed = existing(v)
    observed.dependents = [DependentView(200, "ops", "report", "v", 1, "SELECT 1", (), "o", None, (), False)]
    with pytest.raises(DependentObjectsError, match="never uses CASCADE"):
        build_delete_plan(v, observed)


@pytest.mark.parametrize(
    ("sequence", "expected"),
    [
        (None, "owns no sequence"),
        (OwnedSequence("ops.trips_id_seq", 1, -1, True), "counts down (INCREMENT -1)"),
        (OwnedSequence("ops.trips_id_seq", 50, 1, True), "ALTER SEQUENCE ops.trips_id_seq CACHE 1"),
        (OwnedSequence("ops.trips_id_seq", 1, 1, False), "GRANT SELECT ON SEQUENCE ops.trips_id_seq"),
        (OwnedSequence("ops.trips_id_seq", 1, 1, True), ""),
    ],
)
def test_an_append_only_column_needs_its_own_increasing_sequence_one_value_at_a_time(
    sequence: OwnedSequence | None, expected: str
) -> None:
    table = TableState(5, "r", ("id", "driver_id"), ((20, -1, "bigint"), (23, -1, "integer")), (sequence, None))
    problem = checks._append_only_problem(table, "id", "ops.trips")
    assert (expected in problem) if expected else problem == ""
    assert "owns no sequence" in checks._append_only_problem(table, "driver_id", "ops.trips")
