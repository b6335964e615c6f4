"""Validation names the field and says what is wrong, for every kind of bad input."""

from __future__ import annotations

from typing import Any

import pytest

from matview.api.validation import load_documents, validate_document
from matview.errors import SpecError
from tests.helpers import document, to_yaml, view


def errors_of(doc: Any) -> dict[str, str]:
    with pytest.raises(SpecError) as caught:
        validate_document(doc)
    return {e.path: e.message for e in caught.value.errors}


def test_valid_document_gets_crd_defaults() -> None:
    v = view(indexes=[{"columns": ["one"], "unique": True}])
    assert v.schema == "public"
    assert v.name == "totals"
    assert v.refresh.mode == "Auto"
    assert v.refresh.timeout_seconds == 300
    assert v.refresh.lock_timeout_seconds == 5
    assert v.deletion_policy == "Retain"
    assert v.indexes[0].method == "btree"
    assert v.owner == "ops/totals"


def test_default_name_replaces_dashes() -> None:
    assert view(resource="driver-matrix").name == "driver_matrix"


def test_unknown_field_is_an_error_with_a_suggestion() -> None:
    problems = errors_of(document(refesh={"interval": "1h"}))
    assert "spec.refesh" in problems
    assert "did you mean 'refresh'" in problems["spec.refesh"]


def test_wrong_api_version_and_kind() -> None:
    doc = document()
    doc["apiVersion"] = "matview.dev/v1"
    doc["kind"] = "View"
    problems = errors_of(doc)
    assert "must be matview.dev/v1alpha1" in problems["apiVersion"]
    assert "must be MaterializedView" in problems["kind"]


def test_missing_query_and_metadata_name() -> None:
    doc = document()
    del doc["spec"]["query"]
    del doc["metadata"]["name"]
    problems = errors_of(doc)
    assert problems["spec.query"] == "is required"
    assert problems["metadata.name"] == "is required"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("SELECT 1; DROP TABLE sentinel", "exactly one statement"),
        ("WITH d AS (DELETE FROM sentinel RETURNING *) SELECT * FROM d", "DELETE"),
        ("WITH d AS (UPDATE sentinel SET id = 0 RETURNING *) SELECT * FROM d", "UPDATE"),
        ("WITH d AS (INSERT INTO sentinel VALUES (1) RETURNING *) SELECT * FROM d", "INSERT"),
        ("SELECT * INTO copy FROM sentinel", "SELECT INTO"),
        ("SELECT * FROM sentinel FOR UPDATE", "FOR UPDATE/SHARE"),
        ("SELECT * FROM (SELECT * FROM sentinel FOR SHARE) s", "FOR UPDATE/SHARE"),
        ("DROP TABLE sentinel", "must be a SELECT"),
        ("CALL cleanup()", "must be a SELECT"),
        ("TRUNCATE sentinel", "must be a SELECT"),
        ("SELECT (", "not valid SQL"),
        ("", "must not be empty"),
        ("   ", "found 0"),
    ],
)
def test_query_must_be_one_plain_select(query: str, expected: str) -> None:
    problems = errors_of(document(query=query))
    assert expected in problems["spec.query"]


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("true; DROP TABLE sentinel", "one boolean expression"),
        ("true) OR (SELECT 1", "not valid SQL"),
        ("id IN (SELECT id FROM sentinel)", "subquery"),
        ("true UNION SELECT 1", "one boolean expression"),
        ("true ORDER BY 1", "one boolean expression"),
        ("true LIMIT 1", "one boolean expression"),
    ],
)
def test_where_must_be_one_expression(where: str, expected: str) -> None:
    problems = errors_of(document(indexes=[{"columns": ["one"], "where": where}]))
    assert expected in problems["spec.indexes[0].where"]


def test_where_comment_is_dropped_by_reprinting() -> None:
    v = view(indexes=[{"columns": ["one"], "where": "one > 0 -- ; DROP TABLE x"}])
    assert v.indexes[0].where is not None
    assert v.indexes[0].where.text == "one > 0"


@pytest.mark.parametrize(
    ("field", "value", "path"),
    [
        ("schema", "x" * 64, "spec.schema"),
        ("name", "é" * 32, "spec.name"),
    ],
)
def test_identifiers_are_limited_to_63_bytes(field: str, value: str, path: str) -> None:
    problems = errors_of(document(**{field: value}))
    assert "63" in problems[path]


def test_identifier_with_nul_is_refused() -> None:
    problems = errors_of(document(indexes=[{"columns": ["a\x00b"]}]))
    assert "NUL" in problems["spec.indexes[0].columns[0]"]


def test_any_other_character_is_a_valid_identifier() -> None:
    v = view(schema='we"ird; DROP', name="Order Summary", indexes=[{"columns": ["order", "Mixed Case"]}])
    assert v.schema == 'we"ird; DROP'
    assert v.indexes[0].columns == ("order", "Mixed Case")


@pytest.mark.parametrize(
    ("refresh", "path", "expected"),
    [
        ({"interval": "1h", "schedule": "0 * * * *"}, "spec.refresh", "not both"),
        ({"interval": "soon"}, "spec.refresh.interval", "does not match"),
        ({"interval": "0s"}, "spec.refresh.interval", "too short"),
        ({"interval": "500ms"}, "spec.refresh.interval", "too short"),
        ({"timeout": "0s"}, "spec.refresh.timeout", "too short"),
        ({"schedule": "61 * * * *"}, "spec.refresh.schedule", "not a valid cron"),
        ({"schedule": "0 * * * * *"}, "spec.refresh.schedule", "5 fields"),
        ({"schedule": "0 0 31 2 *"}, "spec.refresh.schedule", "not a valid cron"),
        ({"schedule": "0 * * * *", "timeZone": "Mars/Olympus"}, "spec.refresh.timeZone", "IANA"),
        ({"interval": "1h", "timeZone": "UTC"}, "spec.refresh.timeZone", "schedule only"),
        ({"mode": "Sometimes"}, "spec.refresh.mode", "one of Auto, Concurrent, Full, Swap"),
        ({"mode": "Concurrent"}, "spec.refresh.mode", "unique index without a where"),
        ({"suspend": "yes"}, "spec.refresh.suspend", "true or false"),
    ],
)
def test_refresh_fields(refresh: dict[str, Any], path: str, expected: str) -> None:
    problems = errors_of(document(refresh=refresh))
    assert expected in problems[path], problems


def test_durations_parse() -> None:
    v = view(refresh={"interval": "1h30m", "timeout": "90s", "lockTimeout": "250ms"})
    assert v.refresh.interval_seconds == 5400
    assert v.refresh.timeout_seconds == 90
    assert v.refresh.lock_timeout_seconds == 0.25


def test_concurrent_with_partial_unique_index_is_refused() -> None:
    problems = errors_of(
        document(refresh={"mode": "Concurrent"}, indexes=[{"columns": ["one"], "unique": True, "where": "one > 0"}])
    )
    assert "spec.refresh.mode" in problems
    ok = view(refresh={"mode": "Concurrent"}, indexes=[{"columns": ["one"], "unique": True}])
    assert ok.refresh.mode == "Concurrent"


@pytest.mark.parametrize(
    ("index", "path", "expected"),
    [
        ({"columns": []}, "spec.indexes[0].columns", "at least 1"),
        ({"columns": ["a", "a"]}, "spec.indexes[0].columns", "twice"),
        ({"columns": ["a"], "method": "rtree"}, "spec.indexes[0].method", "one of btree"),
        ({"columns": ["a"], "name": ""}, "spec.indexes[0].name", "empty"),
        ({"columns": "a"}, "spec.indexes[0].columns", "must be a list"),
    ],
)
def test_index_fields(index: dict[str, Any], path: str, expected: str) -> None:
    problems = errors_of(document(indexes=[index]))
    assert expected in problems[path], problems


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ("ops.t; DROP TABLE sentinel", "schema.table"),
        ("a.b.c", "schema.table"),
        ("ONLY ops.t", "schema.table"),
        ("ops.t AS x", "schema.table"),
    ],
)
def test_supporting_index_table(table: str, expected: str) -> None:
    problems = errors_of(document(supportingIndexes=[{"table": table, "columns": ["id"]}]))
    assert expected in problems["spec.supportingIndexes[0].table"]


def test_supporting_index_table_parses_quoted_names() -> None:
    v = view(
        supportingIndexes=[{"table": '"My Schema"."T.x"', "columns": ["id"]}, {"table": "drivers", "columns": ["id"]}]
    )
    assert (v.supporting_indexes[0].table_schema, v.supporting_indexes[0].table) == ("My Schema", "T.x")
    assert (v.supporting_indexes[1].table_schema, v.supporting_indexes[1].table) == ("public", "drivers")


@pytest.mark.parametrize(
    ("grant", "path", "expected"),
    [
        ({"role": "app", "privileges": ["DELETE"]}, "spec.grants[0].privileges[0]", "one of SELECT"),
        ({"privileges": ["SELECT"]}, "spec.grants[0].role", "required"),
        ({"role": ""}, "spec.grants[0].role", "empty"),
    ],
)
def test_grants(grant: dict[str, Any], path: str, expected: str) -> None:
    problems = errors_of(document(grants=[grant]))
    assert expected in problems[path], problems


def test_duplicate_grant_roles_and_index_names() -> None:
    problems = errors_of(
        document(
            grants=[{"role": "a"}, {"role": "a"}],
            indexes=[{"columns": ["x"], "name": "i"}, {"columns": ["y"], "name": "i"}],
        )
    )
    assert "twice" in problems["spec.grants[1].role"]
    assert "already used" in problems["spec.indexes[1]"]


def test_enums_and_types() -> None:
    problems = errors_of(document(deletionPolicy="Orphan", schema=5))
    assert "Retain, Delete" in problems["spec.deletionPolicy"]
    assert "must be a string" in problems["spec.schema"]


def test_all_problems_reported_together() -> None:
    problems = errors_of(document(query="DELETE FROM x", refresh={"interval": "x"}, deletionPolicy="No"))
    assert {"spec.query", "spec.refresh.interval", "spec.deletionPolicy"} <= problems.keys()


def test_yaml_syntax_error_names_line() -> None:
    with pytest.raises(SpecError) as caught:
        load_documents("apiVersion: matview.dev/v1alpha1\nspec: [unclosed\n", "bad.yaml")
    assert caught.value.errors[0].path == "(yaml)"
    assert "line" in caught.value.errors[0].message
    assert "bad.yaml" in str(caught.value)


def test_multi_document_yaml() -> None:
    text = to_yaml(document(resource="a")) + "---\n" + to_yaml(document(resource="b"))
    assert [v.name for v in load_documents(text)] == ["a", "b"]


def test_bad_metadata_name() -> None:
    problems = errors_of(document(resource="Not_Valid"))
    assert "not a valid Kubernetes name" in problems["metadata.name"]


def test_deterministic_index_names_fit_and_differ() -> None:
    long_column = "c" * 63
    v = view(name="n" * 63, indexes=[{"columns": [long_column]}, {"columns": [long_column], "unique": True}])
    names = [v.index_name(i) for i in v.indexes]
    assert all(len(n.encode()) <= 63 for n in names)
    assert names[0] != names[1]
    multibyte = view(name="é" * 31, indexes=[{"columns": ["ü" * 31]}])
    name = multibyte.index_name(multibyte.indexes[0])
    assert len(name.encode()) <= 63
    name.encode().decode()  # still valid UTF-8


def test_each_refresh_default_is_the_crds() -> None:
    from matview.api.durations import parse_duration
    from matview.api.schema import openapi_schema
    from matview.api.spec import RefreshMode, RefreshSpec
    from matview.plan.executor import ExecutionSettings

    refresh = openapi_schema()["properties"]["spec"]["properties"]["refresh"]["properties"]
    assert parse_duration(refresh["timeout"]["default"]) == RefreshSpec.timeout_seconds
    assert parse_duration(refresh["lockTimeout"]["default"]) == RefreshSpec.lock_timeout_seconds
    assert refresh["mode"]["default"] == RefreshSpec.mode == RefreshMode.AUTO
    assert refresh["mode"]["enum"] == [m.value for m in RefreshMode]
    settings = ExecutionSettings()
    assert (settings.statement_timeout_seconds, settings.lock_timeout_seconds) == (
        RefreshSpec.timeout_seconds,
        RefreshSpec.lock_timeout_seconds,
    )


@pytest.mark.parametrize(
    ("partitioning", "field"),
    [
        ("week_start", "spec.partitioning"),
        ({"column": "w", "by": "Hash"}, "spec.partitioning.by"),
        ({"column": "w", "by": "Range", "period": "Fortnight"}, "spec.partitioning.period"),
        ({"column": "w", "by": "Range", "period": "Week", "ahead": -1}, "spec.partitioning.ahead"),
        ({"column": "w", "by": "Range", "period": "Week", "ahead": 10**40}, "spec.partitioning.ahead"),
        ({"column": "w", "by": "Range", "period": "Week", "retain": 26}, "spec.partitioning.retain"),
        ({"column": "w", "by": "Range", "period": "Week", "sources": {"table": "a.b"}}, "spec.partitioning.sources"),
        ({"column": "w", "by": "Range", "period": "Week", "sources": [{"table": "a.b"}]}, "spec.partitioning.sources"),
        (
            {"column": "w", "by": "Range", "period": "Week", "sources": [{"table": "a.b; DROP", "column": "d"}]},
            "spec.partitioning.sources[0].table",
        ),
        ({"column": "x" * 64, "by": "List"}, "spec.partitioning.column"),
        ({"column": "", "by": "List"}, "spec.partitioning.column"),
    ],
)
def test_a_bad_partitioning_is_refused_naming_the_field(partitioning: Any, field: str) -> None:
    body = document("w", storage="Table", query="SELECT current_date AS w", partitioning=partitioning)
    with pytest.raises(SpecError) as raised:
        validate_document(body)
    assert field in str(raised.value), raised.value
