"""Fixtures of the fault suite: one template cluster per session (the report table is the root conftest's:
under pytest-xdist only the controller prints, and it loads no conftest below the root)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import Scenario, template_cluster


@pytest.fixture(scope="session")
def fault_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
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
