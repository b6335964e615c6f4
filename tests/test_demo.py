"""`matview demo` and `matview compare` end to end at a tiny scale, on the suite's real PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg

from matview.embedded.localpg import free_port
from tests.db.catalog_helpers import index_names, is_matview

ROOT = Path(__file__).resolve().parents[1]


def test_demo_builds_the_view_prints_the_comparison_and_serves_metrics(dsn: str) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    process = subprocess.Popen(
        [sys.executable, "-m", "matview.cli", "demo", "--dsn", dsn, "--drivers", "300", "--metrics-port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=env,
    )
    lines: list[str] = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C to stop" in line:
                break
        text = "".join(lines)
        assert "metrics on" in text, text
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert "matview_refresh_interval_seconds" in body
        # The three refreshes the demo printed are in its /metrics, with rows.
        successes = [
            line
            for line in body.splitlines()
            if line.startswith("matview_refreshes_total{") and 'result="success"' in line
        ]
        assert sum(float(line.rsplit(" ", 1)[1]) for line in successes) >= 3, successes
        assert any(line.startswith("matview_rows{") and not line.endswith(" 0.0") for line in body.splitlines())
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)
    for shape in ("first page, unfiltered", "origin_tag + week_start", "one driver", "pending count"):
        assert shape in text
    assert "refresh duration by mode: Concurrent" in text
    with psycopg.connect(dsn) as conn:
        assert is_matview(conn, "ops", "mv_payments_driver_matrix_cabinet")
        assert len(index_names(conn, "ops", "mv_payments_driver_matrix_cabinet")) == 7
    assert process.returncode == 0


def test_compare_reports_ratios_and_refuses_a_bad_fallback(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute((ROOT / "sql/examples/driver_matrix/schema.sql").read_text())
        conn.execute("SELECT ops.load_driver_matrix(300)")
    example = str(ROOT / "examples/driver-matrix.yaml")
    subprocess.run(
        [sys.executable, "-m", "matview.cli", "apply", "--dsn", dsn, example], check=True, cwd=ROOT, capture_output=True
    )

    def compare(fallback: str, *extra: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "matview.cli", "compare", "--dsn", dsn, example, "--fallback", fallback]
        return subprocess.run([*command, *extra], capture_output=True, text=True, cwd=ROOT, check=False)

    result = compare("ops.v_payments_driver_matrix_cabinet", "--repeats", "1")
    assert result.returncode == 0, result.stderr
    assert "first 25 rows" in result.stdout and "driver_id = ?" in result.stdout and "x" in result.stdout
    bad = compare("ops.v; DROP TABLE ops.trips")
    assert bad.returncode == 2
    assert "--fallback: must be a table name" in bad.stderr
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) > 0 FROM ops.trips").fetchone() == (True,)
