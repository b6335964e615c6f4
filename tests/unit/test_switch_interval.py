"""The long-running processes hand the interpreter's lock back to a refresh thread within a millisecond.

At CPython's default (5 ms) a refresh thread waited up to that long after each of its round trips while kopf or
a /metrics scrape was busy in Python: 26 times slower on a 7 ms refresh in ``benchmarks/gil_handoff.py``. How much it
helps is that benchmark's to show; here, that both ``matview run`` and the operator set it before they start.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from matview.cli import build_parser, handler_of
from matview.k8s import main as operator_main
from matview.refresh.settings import SWITCH_INTERVAL_SECONDS


@pytest.fixture
def python_default_interval() -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def test_the_shipped_interval_is_shorter_than_pythons_default() -> None:
    assert SWITCH_INTERVAL_SECONDS < 0.005


@pytest.mark.usefixtures("python_default_interval")
@pytest.mark.parametrize(
    "argv",
    [["run", "--dsn", "postgresql://nowhere.invalid/x", "{empty directory}"], ["operator", "--namespace", "default"]],
)
def test_each_daemon_runs_with_the_interval(argv: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[float] = []

    class Started(Exception):
        """Raised where the daemon would start its event loop: what is set by then is what it runs with."""

    def start_loop(main: Coroutine[Any, Any, Any], *_: object, **__: object) -> None:
        main.close()
        seen.append(sys.getswitchinterval())
        raise Started

    monkeypatch.setattr(asyncio, "run", start_loop)
    monkeypatch.setattr(operator_main, "_config", None)  # what `matview operator` gives kopf's handlers
    args = build_parser().parse_args([str(tmp_path) if arg == "{empty directory}" else arg for arg in argv])
    with pytest.raises(Started):
        handler_of(args.command)(args)
    assert seen == [SWITCH_INTERVAL_SECONDS]
