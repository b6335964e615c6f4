"""Docs generated from the CRD stay in step with it."""

from __future__ import annotations

from pathlib import Path

from matview.apidoc import render

ROOT = Path(__file__).resolve().parents[2]


def test_api_reference_matches_the_crd() -> None:
    assert (ROOT / "docs/api.md").read_text() == render(), "run: python -m matview.apidoc > docs/api.md"


def test_reference_covers_every_spec_field() -> None:
    text = render()
    for field in (
        "spec.query",
        "spec.indexes[].where",
        "spec.supportingIndexes[].table",
        "spec.refresh.mode",
        "spec.grants[].privileges",
        "spec.deletionPolicy",
        "spec.database.secretRef.key",
        "status.lastRefresh.durationSeconds",
    ):
        assert f"`{field}`" in text


def test_the_readme_example_is_a_valid_materialized_view() -> None:
    import re

    from matview.api.validation import load_documents

    block = re.search(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block is not None
    (view,) = load_documents(block.group(1), "README.md")
    assert view.run_as_role == "reporting_views" and view.search_path == ()


def test_the_reference_spells_defaults_as_yaml() -> None:
    text = render()
    assert "default `false`" in text and "default `False`" not in text and "default `True`" not in text


def test_ci_runs_the_readmes_test_command_verbatim() -> None:
    import re

    block = re.search(r"## Run all tests\n\n```sh\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    assert block is not None, "README.md has no 'Run all tests' command block"
    commands = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line and not line.startswith("#")]
    assert commands[-1] == block.group(1), ".ci/run must end with the README's test command, verbatim"
