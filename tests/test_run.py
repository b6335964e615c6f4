"""`matview run` as a user runs it: a real process keeping views fresh, with /metrics, reload and SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from matview.embedded.localpg import free_port
from tests.db.catalog_helpers import index_names
from tests.helpers import document, to_yaml

ROOT = Path(__file__).resolve().parents[1]


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"gave up waiting for {what}")


def start_run(dsn: str, *arguments: str) -> subprocess.Popen[str]:
    """`matview run --dsn DSN ARGUMENTS…` as a user starts it (no DATABASE_URL from the test's environment), with
    no control socket unless ARGUMENTS name one (the suite's processes share a working directory)."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return subprocess.Popen(
        [sys.executable, "-m", "matview.cli", "run", "--dsn", dsn, "--control-socket", "", *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=env,
    )


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def successes(port: int) -> float:
    return sum(
        v
        for (name, labels), v in scrape(port).items()
        if name == "matview_refreshes_total" and ("result", "success") in labels
    )


def create_sales(dsn: str) -> None:
    """public.sales: 100 rows over three regions, what the tests of `matview run` keep a view of."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE public.sales (id int PRIMARY KEY, region text, amount int);"
            "INSERT INTO public.sales SELECT g, 'r' || (g % 3), g FROM generate_series(1, 100) g"
        )


def test_run_refreshes_on_schedule_reloads_and_stops_on_sigterm(dsn: str, tmp_path: Path) -> None:
    create_sales(dsn)
    specs = tmp_path / "specs"
    specs.mkdir()
    spec = specs / "sales.yaml"
    body = {
        "query": "SELECT region, sum(amount) AS total FROM public.sales GROUP BY region",
        "indexes": [{"columns": ["region"], "unique": True}],
        "refresh": {"interval": "2s"},
    }
    spec.write_text(to_yaml(document("sales-by-region", "shop", **body)))
    port = free_port()
    process = start_run(dsn, "--metrics-port", str(port), "--metrics-address", "127.0.0.1", str(specs))
    try:
        wait_for(lambda: successes(port) >= 2, "two scheduled refreshes")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO public.sales VALUES (1000, 'r1', 1000)")
            expected = conn.execute("SELECT sum(amount) FROM public.sales WHERE region = 'r1'").fetchone()
            wait_for(
                lambda: (
                    conn.execute("SELECT total FROM public.sales_by_region WHERE region = 'r1'").fetchone() == expected
                ),
                "the new row to appear in the view",
            )
            body["indexes"].append({"columns": ["total"]})  # type: ignore[attr-defined]
            spec.write_text(to_yaml(document("sales-by-region", "shop", **body)))
            wait_for(
                lambda: len(index_names(conn, "public", "sales_by_region")) == 2,
                "the edited file to be applied",
            )
        samples = scrape(port)
        labels = frozenset({("namespace", "shop"), ("name", "sales-by-region")})
        assert samples[("matview_refresh_interval_seconds", labels)] == 2
        assert samples[("matview_last_refresh_success_timestamp_seconds", labels)] > time.time() - 60
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    # One line per refresh at INFO (at a hundred refreshes a second, each line costs throughput).
    assert "refresh start:" not in output
    assert "refresh end: relation=public.sales_by_region" in output and "result=success" in output


def test_run_repairs_a_capture_trigger_dropped_while_it_runs(dsn: str, tmp_path: Path) -> None:
    """A drift check in `matview run` re-applies each view: a dropped capture trigger comes back, and the
    writes made while it was missing reach the view through the full rebuild the repair requests."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE public.events (k int NOT NULL, v int NOT NULL);"
            "INSERT INTO public.events SELECT g % 5, g FROM generate_series(1, 50) g"
        )
    spec = tmp_path / "events.yaml"
    body = {
        "storage": "Table",
        "query": "SELECT k, sum(v) AS total FROM public.events GROUP BY k",
        "indexes": [{"columns": ["k"], "unique": True}],
        "incremental": {"keyColumns": ["k"], "sources": [{"table": "public.events", "columns": ["k"]}]},
        "refresh": {"interval": "1s"},
    }
    spec.write_text(to_yaml(document("event-totals", "shop", **body)))
    process = start_run(dsn, "--metrics-port", "0", "--drift-check-seconds", "1", str(spec))
    triggers = "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.events'::regclass AND NOT tgisinternal"
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            wait_for(lambda: conn.execute(triggers).fetchone() == (4,), "capture installed")
            name = conn.execute(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = 'public.events'::regclass AND tgname LIKE '%%_u'"
            ).fetchone()
            assert name is not None
            conn.execute(f'DROP TRIGGER "{name[0]}" ON public.events')
            conn.execute("UPDATE public.events SET v = v + 100 WHERE k = 2")  # not captured: no trigger
            wait_for(lambda: conn.execute(triggers).fetchone() == (4,), "the trigger repaired by a drift check")
            expected = conn.execute("SELECT sum(v) FROM public.events WHERE k = 2").fetchone()
            wait_for(
                lambda: conn.execute("SELECT total FROM public.event_totals WHERE k = 2").fetchone() == expected,
                "the missed write in the view (a full rebuild after the repair)",
            )
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "drift check repaired" in output, output[-3000:]


def test_a_metrics_port_in_use_is_an_error_naming_it_not_a_traceback(dsn: str, tmp_path: Path) -> None:
    spec = tmp_path / "sales.yaml"
    spec.write_text(to_yaml(document("sales-by-region", "shop", query="SELECT 1 AS one")))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = start_run(dsn, "--metrics-port", str(port), "--metrics-address", "127.0.0.1", str(spec))
        output, _ = process.communicate(timeout=120)
    assert process.returncode == 1, output
    assert f"error: cannot serve /metrics on 127.0.0.1:{port}" in output and "--metrics-port" in output
    assert "Traceback" not in output
