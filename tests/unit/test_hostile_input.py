"""Regression tests for hostile documents that once crashed validation (issue #10).

Each one must end in a SpecError that names the field, never a traceback, a signal or an unbounded
wait; the CLI cases run `matview validate` in a subprocess so that a crash of the process itself
(SIGSEGV in the parser) would show as a wrong exit code.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from matview.api import parsing
from matview.api.validation import DURATION_BOUNDS, load_documents, validate_document
from matview.errors import SpecError
from tests.helpers import document, to_yaml


def refusal(doc_or_text: dict[str, Any] | str) -> dict[str, str]:
    """The field → message map of the SpecError the document must raise."""
    text = doc_or_text if isinstance(doc_or_text, str) else to_yaml(doc_or_text)
    with pytest.raises(SpecError) as caught:
        load_documents(text, "hostile.yaml")
    return {error.path: error.message for error in caught.value.errors}


def chain(terms: int, operator: str = "1+") -> str:
    return "SELECT " + operator * terms + "1 AS x"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"indexes": [5]}, "spec.indexes[0]"),
        ({"refresh": "hourly"}, "spec.refresh"),
        ({"indexes": [{"columns": [1]}]}, "spec.indexes[0].columns[0]"),
        ({"database": {"secretRef": 5}}, "spec.database.secretRef"),
        ({"supportingIndexes": [{"table": 7, "columns": ["a"]}]}, "spec.supportingIndexes[0].table"),
        ({"grants": ["reporting"]}, "spec.grants[0]"),
        ({"grants": [{"role": ["a"]}]}, "spec.grants[0].role"),
        ({"refresh": {"interval": 5}}, "spec.refresh.interval"),
        ({"refresh": {"timeZone": 5, "schedule": "0 * * * *"}}, "spec.refresh.timeZone"),
        ({"searchPath": "public"}, "spec.searchPath"),
        ({"runAsRole": {"name": "x"}}, "spec.runAsRole"),
        ({"query": ["SELECT 1"]}, "spec.query"),
    ],
)
def test_wrong_types_are_refused_naming_the_field(spec: dict[str, Any], field: str) -> None:
    errors = refusal(document(**spec))
    assert field in errors
    assert errors[field].startswith("must be ")


def test_a_query_deeper_than_the_parser_stack_is_refused_not_a_crash(tmp_path: Path) -> None:
    # 30,000 terms (60 KB, under the CRD's maxLength) once killed the process with SIGSEGV in the C parser.
    file = tmp_path / "deep.yaml"
    file.write_text(to_yaml(document(query=chain(30_000))))
    done = subprocess.run(
        [sys.executable, "-m", "matview.cli", "validate", str(file)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert "spec.query: nests" in done.stderr
    assert f"at most {parsing.MAX_NESTING_DEPTH}" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("operator", ["1+", "a||"])
def test_long_operator_chains_within_the_limit_validate(operator: str) -> None:
    # 500 `1+` terms and 200 `a||a` terms once ended in a RecursionError in the printer.
    query = chain(900, operator) if operator == "1+" else "SELECT " + "a||" * 900 + "a FROM s.t"
    view = validate_document(document(query=query))
    assert view.query.text.count(operator.strip("1a")) == 900


def test_the_nesting_limit_is_the_one_the_crd_states() -> None:
    crd = yaml.safe_load(Path("crds/matview.dev_materializedviews.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert f"{parsing.MAX_NESTING_DEPTH} levels of nesting" in spec["query"]["description"]
    assert str(spec["query"]["maxLength"]) in spec["query"]["description"]
    errors = refusal(document(query=chain(parsing.MAX_NESTING_DEPTH + 10)))
    assert "nests" in errors["spec.query"]


def test_deep_predicates_and_names_are_refused_too() -> None:
    errors = refusal(document(indexes=[{"columns": ["x"], "where": "x" + "+1" * 1200 + ">0"}]))
    assert "nests" in errors["spec.indexes[0].where"]


def test_parsing_leaves_the_recursion_limit_of_other_threads_alone() -> None:
    before = sys.getrecursionlimit()
    validate_document(document(query=chain(900)))
    assert sys.getrecursionlimit() == before


def alias_bomb(levels: int = 9) -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        name, previous = chr(ord("a") + i), chr(ord("a") + i - 1)
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    spec = "\n".join("    " + line for line in lines)
    return (
        "apiVersion: matview.dev/v1alpha1\nkind: MaterializedView\nmetadata: {name: bomb}\n"
        f"spec:\n  query: SELECT 1\n  indexes:\n  - columns: [a]\n    bomb:\n{spec}\n"
    )


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (alias_bomb(), "expands to more than"),
        ("spec: " + "[" * 5000 + "]" * 5000, "nesting is deeper than"),
        ("spec: " + "{a: " * 5000 + "1" + "}" * 5000, "nesting is deeper than"),
        ("spec: {x: " + "9" * 5000 + "}", "an integer has 5000 digits"),
        ("a: 1\n" * 10 + "x" * (3 * 1024 * 1024), "bytes; at most"),
        ("---\n" + "---\na: 1\n" * 1001, "more than 1000 documents"),
        ("{[1]: 2}", "unhashable key"),
    ],
)
def test_unbounded_yaml_is_refused_early(text: str, words: str) -> None:
    errors = refusal(text)
    assert words in errors["(yaml)"]


def test_anchors_and_aliases_within_bounds_still_work() -> None:
    text = to_yaml(document(query="SELECT 1 AS a")).replace("spec:\n", "spec: &s\n") + "---\n"
    assert [v.name for v in load_documents(text)] == ["totals"]


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "latin1.yaml"
    file.write_bytes(to_yaml(document(query="SELECT 1 AS e")).replace("SELECT 1", "SELECT 'é'").encode("latin-1"))
    from matview.api.validation import load_file

    with pytest.raises(SpecError) as caught:
        load_file(file)
    assert "not UTF-8" in str(caught.value)


@pytest.mark.parametrize(
    ("refresh", "field", "words"),
    [
        ({"timeout": "600h"}, "spec.refresh.timeout", "maximum is 596h"),
        ({"lockTimeout": "597h"}, "spec.refresh.lockTimeout", "maximum is 596h"),
        ({"interval": "99999999999h"}, "spec.refresh.interval", "maximum is 8784h"),
        ({"interval": "9" * 30 + "h"}, "spec.refresh.interval", "maximum is 8784h"),
        ({"interval": "0.5s"}, "spec.refresh.interval", "minimum is 1s"),
    ],
)
def test_durations_beyond_what_postgresql_and_the_scheduler_accept_are_refused(
    refresh: dict[str, str], field: str, words: str
) -> None:
    assert words in refusal(document(refresh=refresh))[field]


def test_the_largest_durations_allowed_work_in_the_scheduler() -> None:
    import datetime as dt

    from matview.refresh.schedule import next_run

    view = validate_document(document(refresh={"interval": "8784h", "timeout": "596h", "lockTimeout": "596h"}))
    now = dt.datetime.now(dt.UTC)
    assert next_run(view, now, now) is not None
    assert view.refresh.timeout_seconds * 1000 <= 2_147_483_647


def test_the_crd_states_the_same_duration_bounds() -> None:
    crd = yaml.safe_load(Path("crds/matview.dev_materializedviews.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    rules = " ".join(
        rule["rule"] for block in ("refresh", "incremental") for rule in spec[block]["x-kubernetes-validations"]
    )

    def go_duration(seconds: float) -> str:
        return (
            f"{seconds / 3600:g}h" if seconds >= 3600 else f"{seconds:g}s" if seconds >= 1 else f"{seconds * 1000:g}ms"
        )

    for field, bounds in DURATION_BOUNDS.items():
        assert f"duration(self.{field}) >= duration('{go_duration(bounds.minimum)}')" in rules
        assert f"duration(self.{field}) <= duration('{go_duration(bounds.maximum)}')" in rules


@pytest.mark.parametrize(
    ("secret", "field"),
    [
        ({"name": "../kube-system/admin"}, "spec.database.secretRef.name"),
        ({"name": "Upper"}, "spec.database.secretRef.name"),
        ({"name": "db", "key": "a/b"}, "spec.database.secretRef.key"),
    ],
)
def test_secret_references_have_the_kubernetes_format(secret: dict[str, str], field: str) -> None:
    assert "does not match the pattern" in refusal(document(database={"secretRef": secret}))[field]


@pytest.mark.parametrize(
    ("search_path", "words"),
    [(["pg_catalog"], "always searched first"), (["pg_temp"], "searched last"), (["a", "a"], "listed twice")],
)
def test_search_path_refuses_pinned_and_repeated_schemas(search_path: list[str], words: str) -> None:
    errors = refusal(document(searchPath=search_path))
    assert any(words in message for path, message in errors.items() if path.startswith("spec.searchPath["))


def test_huge_values_are_described_briefly() -> None:
    errors = refusal(document(refresh={"timeZone": "x" * 50, "schedule": "0 * * * *"}, deletionPolicy=["x"] * 10_000))
    assert all(len(message) < 300 for message in errors.values())


@pytest.mark.parametrize("ratio", [float("nan"), float("inf"), -1, -0.5, 1.5])
def test_full_rebuild_ratio_outside_zero_to_one_is_refused(ratio: float) -> None:
    incremental = {"keyColumns": ["k"], "sources": [{"table": "a.b", "columns": ["k"]}], "fullRebuildRatio": ratio}
    errors = refusal(document(query="SELECT 1 AS k", storage="Table", incremental=incremental))
    assert "spec.incremental.fullRebuildRatio" in errors, errors


def test_a_list_far_over_its_limit_is_refused_without_checking_each_item() -> None:
    """15,000 sources (half a megabyte): one problem for the list, none for its items."""
    sources = [{"table": f"a.b{i}", "columns": 5} for i in range(15_000)]
    incremental = {"keyColumns": ["k"], "sources": sources}
    errors = refusal(document(query="SELECT 1 AS k", storage="Table", incremental=incremental))
    assert "must have at most 32 items, got 15000" in errors["spec.incremental.sources"]
    assert not [path for path in errors if path.startswith("spec.incremental.sources[")], errors


def test_an_oversized_partition_column_is_refused_once_and_not_echoed_into_other_messages() -> None:
    """Found by the fuzz suite: a 1,000-character partition column was refused by name, and quoted again in
    full by the unique-index rule (1,156 characters)."""
    errors = refusal(
        document(
            storage="Table",
            partitioning={"column": "x" * 1000, "by": "List"},
            indexes=[{"columns": ["region"], "unique": True}],
        )
    )
    assert "spec.partitioning.column" in errors
    assert "spec.indexes[0].columns" not in errors
    assert all(len(message) < 600 for message in errors.values()), errors
