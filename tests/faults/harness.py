"""What every fault scenario needs: its own PostgreSQL, a `matview run` process, a reader, and the counts.

Each scenario gets a private cluster (copied from a template made once per session, so it can be stopped,
crashed and restarted without touching any other test), a login role with a password (so credentials
can rotate), a workload whose refresh can be slowed down or made to fail at will, the runner as a real
process reading its DSN from a file, and a reader thread that queries the view every 20 ms. At the end a
scenario reports rows lost (the view against a full recompute), reader errors while the server was up,
failures counted by /metrics against failures injected, and the time to recover.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import psycopg
import yaml
from prometheus_client.parser import text_string_to_metric_families

from matview.embedded.localpg import LocalServer, find_bindir, free_port

ROOT = Path(__file__).resolve().parents[2]
#: Where the scenarios of one pytest run append their rows: set by the root conftest at session start, so
#: that pytest-xdist's workers write where the controller reads, and two runs side by side do not mix.
REPORT_VARIABLE = "MATVIEW_FAULT_REPORT"


def report_file() -> Path:
    return Path(os.environ.get(REPORT_VARIABLE, "/tmp/matview-fault-report.jsonl"))


NAMESPACE, NAME = "faults", "totals"
REPORT_COLUMNS = (
    "scenario",
    "rows_lost",
    "reader_errors",
    "reads",
    "failures_counted",
    "failures_injected",
    "successes",
    "recovery_seconds",
)


def report_table() -> list[str]:
    """The fault suite's table, one line a scenario that ran (empty when none did)."""
    if not report_file().exists():
        return []
    rows = [json.loads(line) for line in report_file().read_text().splitlines() if line.strip()]
    if not rows:
        return []
    return [" | ".join(REPORT_COLUMNS)] + [" | ".join(str(row.get(c)) for c in REPORT_COLUMNS) for row in rows]


WORKLOAD = """
CREATE ROLE app LOGIN PASSWORD 'first-password';
CREATE SCHEMA app AUTHORIZATION app;
SET ROLE app;
CREATE TABLE app.ctl (slow_seconds float NOT NULL);
INSERT INTO app.ctl VALUES (0);
-- Sleeps for app.ctl.slow_seconds: a scenario makes the next refresh slow without changing the query.
CREATE FUNCTION app.pause() RETURNS int LANGUAGE sql VOLATILE AS
  'SELECT 1 FROM (SELECT pg_sleep(slow_seconds) FROM app.ctl) s';
CREATE TABLE app.events (id int PRIMARY KEY, kind text NOT NULL, amount int NOT NULL);
INSERT INTO app.events SELECT g, 'k' || (g % 50), 1 + g % 97 FROM generate_series(1, 5000) g;
RESET ROLE;
"""

#: min(100 / amount) makes the query fail on a row with amount 0: "the query failing on new data".
QUERY = (
    "SELECT kind, count(*) AS n, sum(amount) AS total, min(100 / amount) AS guard "
    "FROM app.events, (SELECT app.pause() AS p) s GROUP BY kind"
)
EXPECTED = "SELECT kind, count(*) AS n, sum(amount) AS total FROM app.events GROUP BY kind ORDER BY kind"
ACTUAL = "SELECT kind, n, total FROM app.totals ORDER BY kind"


def spec(mode: str = "Auto", interval: str = "3s", timeout: str = "60s", query: str = QUERY) -> dict[str, Any]:
    return {
        "apiVersion": "matview.dev/v1alpha1",
        "kind": "MaterializedView",
        "metadata": {"name": NAME, "namespace": NAMESPACE},
        "spec": {
            "schema": "app",
            "query": query,
            "indexes": [{"columns": ["kind"], "unique": True}],
            "refresh": {"interval": interval, "mode": mode, "timeout": timeout, "lockTimeout": "1s"},
        },
    }


def template_cluster(base: Path) -> Path:
    """initdb once; scenarios copy the stopped cluster (cp -a keeps the server user's ownership)."""
    server = LocalServer(base / "template", bindir=find_bindir(prefer="system"))
    server.start()
    server.stop()
    return server.data_dir


@dataclass
class Reader:
    """Queries the view every 20 ms on its own connection; counts errors while the server is meant to be up."""

    dsn: str
    server_up: threading.Event
    reads: int = 0
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=2)
                self.read(conn)
                self.reads += 1
            except psycopg.Error as exc:
                if self.server_up.is_set():
                    self.errors.append(str(exc).strip().splitlines()[0])
                with contextlib.suppress(Exception):
                    if conn is not None:
                        conn.close()
                conn = None
                time.sleep(0.1)
            time.sleep(0.02)
        if conn is not None:
            conn.close()

    def read(self, conn: psycopg.Connection[Any]) -> None:
        """One read; a subclass checks what it read."""
        conn.execute("SELECT count(*), sum(total) FROM app.totals").fetchone()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


@dataclass
class Scenario:
    """One fault scenario's world; use as a context manager."""

    name: str
    workdir: Path
    mode: str = "Auto"
    settings: dict[str, str] = field(default_factory=dict)
    server: LocalServer = field(init=False)
    server_up: threading.Event = field(default_factory=threading.Event)
    runners: list[tuple[subprocess.Popen[str], int, Path]] = field(default_factory=list)
    counted: dict[str, float] = field(default_factory=dict)
    """Per-runner-incarnation totals of failures and successes, last scraped (survive a SIGKILL)."""
    injected: int = 0
    recovery_seconds: float | None = None
    reader: Reader | None = None
    expected_sql: str = EXPECTED
    """The full recompute the view must equal (a scenario that edits the query changes it)."""
    actual_sql: str = ACTUAL
    """The view's rows, in the order of expected_sql."""

    # -- lifecycle --------------------------------------------------------------------------------------
    template: Path | None = None
    """An initdb'd, stopped cluster to copy (see template_cluster)."""

    def __enter__(self) -> Scenario:
        self.workdir.mkdir(parents=True)
        data = self.workdir / "data"
        assert self.template is not None
        subprocess.run(["cp", "-a", str(self.template), str(data)], check=True)
        self.server = LocalServer(data, bindir=find_bindir(prefer="system"), settings=self.settings)
        self.start_server()
        with self.admin() as conn:
            conn.execute(WORKLOAD)
        hba = data / "pg_hba.conf"
        hba.write_text(
            "host all postgres 127.0.0.1/32 trust\nhost all app 127.0.0.1/32 scram-sha-256\n"
        )  # the runner logs in with a password, so it can be rotated
        with self.admin() as conn:
            conn.execute("SELECT pg_reload_conf()")
        self.dsn_file.touch(mode=0o600)  # matview refuses a DSN file others can read, as libpq does .pgpass
        self.dsn_file.write_text(self.app_dsn("first-password"))
        self.specs.mkdir()
        self.write_spec(spec(self.mode))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.reader is not None:
            self.reader.stop()
        for process, _, _ in self.runners:
            if process.poll() is None:
                process.kill()
            with contextlib.suppress(Exception):
                process.communicate(timeout=10)
        with contextlib.suppress(Exception):
            self.server.stop("immediate")
        shutil.rmtree(self.workdir / "data", ignore_errors=True)

    def start_server(self) -> None:
        self.server.start()
        self.server_up.set()

    def stop_server(self, mode: str = "immediate") -> None:
        self.server_up.clear()
        self.server.stop(mode)

    # -- connections and files -------------------------------------------------------------------------
    @property
    def dsn_file(self) -> Path:
        return self.workdir / "dsn"

    @property
    def specs(self) -> Path:
        return self.workdir / "specs"

    def app_dsn(self, password: str) -> str:
        return f"postgresql://app:{password}@127.0.0.1:{self.server.port}/postgres?connect_timeout=3"

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.server.dsn(), autocommit=True, connect_timeout=5)

    def write_spec(self, document: dict[str, Any]) -> None:
        target = self.specs / "totals.yaml"
        staged = self.specs.parent / "totals.yaml.new"
        staged.write_text(yaml.safe_dump(document, sort_keys=False))
        staged.replace(target)  # atomic: the runner never reads half a file

    def set_slow(self, seconds: float) -> None:
        with self.admin() as conn:
            conn.execute("UPDATE app.ctl SET slow_seconds = %s", (seconds,))

    def add_rows(self, count: int = 100) -> None:
        with self.admin() as conn:
            conn.execute(
                "INSERT INTO app.events SELECT g, 'k' || (g %% 50), 1 + g %% 97 "
                "FROM generate_series((SELECT max(id) + 1 FROM app.events), (SELECT max(id) + %s FROM app.events)) g",
                (count,),
            )

    # -- the runner ------------------------------------------------------------------------------------
    def start_runner(self, *extra: str) -> subprocess.Popen[str]:
        port = free_port()
        log = self.workdir / f"runner-{len(self.runners)}.log"
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "matview.cli",
                "run",
                "--dsn-file",
                str(self.dsn_file),
                "--metrics-port",
                str(port),
                "--metrics-address",
                "127.0.0.1",
                "--retry-seconds",
                "1",
                "--control-socket",
                str(self.workdir / "run.sock"),
                *extra,
                str(self.specs),
            ],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env=env,
        )
        self.runners.append((process, port, log))
        return process

    def kill_runner(self, process: subprocess.Popen[str]) -> None:
        self.scrape_all()
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-4000:]}" for _, _, log in self.runners)

    def scrape(self, port: int) -> dict[str, float]:
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3).read().decode()
        except OSError:
            return {}
        totals = {"failures": 0.0, "successes": 0.0, "skipped": 0.0}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.labels.get("namespace") != NAMESPACE or sample.labels.get("name") != NAME:
                    continue
                if sample.name == "matview_refresh_failures_total":
                    totals["failures"] += sample.value
                elif sample.name == "matview_refreshes_total" and sample.labels.get("result") == "success":
                    totals["successes"] += sample.value
                elif sample.name == "matview_refreshes_total" and sample.labels.get("result") == "skipped":
                    totals["skipped"] += sample.value
        return totals

    def scrape_all(self) -> dict[str, float]:
        """Totals over every runner incarnation (a killed runner keeps its last scraped numbers)."""
        for process, port, _ in self.runners:
            if process.poll() is None:
                found = self.scrape(port)
                if found:
                    for key, value in found.items():
                        self.counted[f"{port}:{key}"] = value
        totals = {"failures": 0.0, "successes": 0.0, "skipped": 0.0}
        for key, value in self.counted.items():
            totals[key.split(":", 1)[1]] += value
        return totals

    # -- observations ----------------------------------------------------------------------------------
    def start_reader(self) -> Reader:
        self.reader = Reader(self.server.dsn(), self.server_up).start()
        return self.reader

    def fresh(self) -> bool:
        """The view exists, is populated and equals a full recompute of its query."""
        try:
            with self.admin() as conn:
                expected = conn.execute(self.expected_sql).fetchall()
                return conn.execute(self.actual_sql).fetchall() == expected
        except psycopg.Error:
            return False

    def rows_lost(self) -> int:
        """Rows of the full recompute that the view lacks or has wrong (0 when fresh)."""
        with self.admin() as conn:
            expected = set(conn.execute(self.expected_sql).fetchall())
            try:
                actual = set(conn.execute(self.actual_sql).fetchall())
            except psycopg.Error:
                return len(expected)
        return len(expected - actual)

    def wait(self, check: Callable[[], bool], what: str, seconds: float = 90) -> float:
        """Wait for check; returns how long it took."""
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            if check():
                return time.monotonic() - start
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: gave up waiting for {what} after {seconds:.0f}s\n{self.logs()}")

    def refreshing(self) -> bool:
        """A refresh of the view is running in the server (it is inside app.pause): a materialized view's, or
        the build of a table (a partition's)."""
        with contextlib.suppress(psycopg.Error), self.admin() as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'matview-operator' "
                "AND state = 'active' "
                "AND query ~* '(refresh materialized view|create materialized view|create table [^ ]+ as select)'"
            ).fetchone()
            return bool(row and row[0])
        return False

    def recover(self, bound_seconds: float) -> float:
        """After the fault ended: new rows go in, and the view must show them within bound_seconds."""
        self.add_rows(50)
        self.recovery_seconds = self.wait(self.fresh, "the view to be fresh again", bound_seconds)
        return self.recovery_seconds

    def report(self, **extra: Any) -> dict[str, Any]:
        totals = self.scrape_all()
        row = {
            "scenario": self.name,
            "rows_lost": self.rows_lost(),
            "reader_errors": len(self.reader.errors) if self.reader else 0,
            "reads": self.reader.reads if self.reader else 0,
            "failures_counted": int(totals["failures"]),
            "failures_injected": self.injected,
            "successes": int(totals["successes"]),
            "recovery_seconds": round(self.recovery_seconds, 1) if self.recovery_seconds is not None else None,
            **extra,
        }
        with report_file().open("a") as out:
            out.write(json.dumps(row) + "\n")
        return row
