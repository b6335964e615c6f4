"""Fixtures of the fault suite: one template cluster per session, and the report table at the end."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import REPORT, Scenario, template_cluster

_COLUMNS = (
    "scenario",
    "rows_lost",
    "reader_errors",
    "reads",
    "failures_counted",
    "failures_injected",
    "successes",
    "recovery_seconds",
)


@pytest.fixture(scope="session")
def fault_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with contextlib.suppress(FileNotFoundError):
        REPORT.unlink()
    return template_cluster(tmp_path_factory.mktemp("fault-template"))


@pytest.fixture
def world(fault_template: Path, tmp_path: Path) -> Iterator[Callable[..., Scenario]]:
    """world(name, mode=..., settings=...) builds a Scenario; it is torn down after the test."""
    made: list[Scenario] = []

    def make(name: str, **kwargs: Any) -> Scenario:
        made.append(Scenario(name, tmp_path / name, template=fault_template, **kwargs).__enter__())
        return made[-1]

    yield make
    for scenario in made:
        scenario.__exit__(None, None, None)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not REPORT.exists():
        return
    rows = [json.loads(line) for line in REPORT.read_text().splitlines() if line.strip()]
    if not rows:
        return
    terminalreporter.section("fault suite")
    terminalreporter.write_line(" | ".join(_COLUMNS))
    for row in rows:
        terminalreporter.write_line(" | ".join(str(row.get(column)) for column in _COLUMNS))
