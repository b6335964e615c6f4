"""The change listener (matview.client.listen) across a PostgreSQL restart: it reconnects by itself, says
that it may have missed changes (a gap), and then reports the next refresh as before."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from matview import client
from matview.api.validation import validate_document
from matview.plan import engine
from matview.refresh import refresh
from tests.faults.harness import Scenario, spec


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def test_the_listener_survives_a_restart_and_reports_the_gap(world: Callable[..., Scenario]) -> None:
    w = world("listener")
    view = validate_document(spec("Concurrent"))
    dsn = w.app_dsn("first-password")
    with engine.connect(dsn) as conn:
        engine.apply(conn, view)
    changes: list[client.Change] = []
    listening = threading.Event()
    stop = threading.Event()

    def listen() -> None:
        for change in client.listen(
            dsn,
            [f"{view.schema}.{view.name}"],
            stop=stop.is_set,
            poll_seconds=0.1,
            reconnect_seconds=0.2,
            on_listening=listening.set,
        ):
            changes.append(change)

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    try:
        wait_for(listening.is_set, "the listener to listen")
        with engine.connect(dsn) as conn:
            assert refresh(conn, view, "Concurrent").result == "success"
        wait_for(lambda: len(changes) == 1, "the first change")
        assert changes[0].mode == "Concurrent" and not changes[0].gap
        listening.clear()
        w.stop_server("immediate")
        w.start_server()
        wait_for(listening.is_set, "the listener to listen again")
        with engine.connect(dsn) as conn:
            assert refresh(conn, view, "Full").result == "success"
        wait_for(lambda: len(changes) == 3, "the gap and the next change")
    finally:
        stop.set()
        thread.join(timeout=30)
    gap, after = changes[1], changes[2]
    assert gap.gap and gap.relation is None
    assert after.mode == "Full" and after.version is not None and changes[0].version is not None
    assert after.version > changes[0].version
