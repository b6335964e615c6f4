"""`matview refresh` handed to a running `matview run` (cli/control.py): real processes, a real database.

What is counted: the refreshes the run reports in its metrics against the commands that were handed to it,
and the rows the view holds after each command, whoever refreshed it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from matview.cli import control
from matview.embedded.localpg import free_port
from tests.helpers import document, to_yaml
from tests.test_run import ROOT, create_sales, scrape, start_run, successes, wait_for

QUERY = "SELECT region, sum(amount) AS total FROM public.sales GROUP BY region"


def matview_refresh(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return subprocess.run(
        [sys.executable, "-m", "matview.cli", "refresh", "--dsn", dsn, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
        check=False,
    )


def scheduled(port: int) -> float:
    return sum(v for (name, _), v in scrape(port).items() if name == "matview_scheduled_views")


def total_r1(dsn: str) -> tuple[Any, Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        stored = conn.execute("SELECT total FROM public.sales_by_region WHERE region = 'r1'").fetchone()
        wanted = conn.execute("SELECT sum(amount) FROM public.sales WHERE region = 'r1'").fetchone()
    return stored, wanted


def add_sale(dsn: str, sale_id: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO public.sales VALUES (%s, 'r1', %s)", (sale_id, sale_id))


@pytest.fixture
def serving(dsn: str, tmp_path: Path) -> Any:
    """A `matview run` serving one spec file (refreshed hourly, so only what is handed to it refreshes it),
    once its view is applied and scheduled: yields (spec file, control socket, metrics port, process)."""
    create_sales(dsn)
    specs = tmp_path / "specs"
    specs.mkdir()
    spec = specs / "sales.yaml"
    body = {"query": QUERY, "indexes": [{"columns": ["region"], "unique": True}], "refresh": {"interval": "1h"}}
    spec.write_text(to_yaml(document("sales-by-region", "shop", **body)))
    sock, port = tmp_path / "run.sock", free_port()
    process = start_run(
        dsn, "--metrics-port", str(port), "--metrics-address", "127.0.0.1", "--control-socket", str(sock), str(specs)
    )
    try:
        wait_for(lambda: scheduled(port) == 1, "the view to be applied and scheduled")
        yield spec, sock, port, process
    finally:
        killed_by_the_test = process.poll() is not None
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    if not killed_by_the_test:
        assert process.returncode == 0, output
        assert not sock.exists(), "the run leaves no socket behind"


def test_a_refresh_is_handed_to_the_run_that_serves_the_same_files(dsn: str, serving: Any) -> None:
    spec, sock, port, process = serving
    assert sock.stat().st_mode & 0o777 == 0o600
    handed_before = successes(port)
    for sale_id in (1001, 1002, 1003):
        add_sale(dsn, sale_id)
        done = matview_refresh(dsn, "--json", "--control-socket", str(sock), str(spec))
        assert done.returncode == 0, done.stderr
        [result] = json.loads(done.stdout)
        assert result["result"] == "success" and result["relation"] == "public.sales_by_region"
        assert result["refreshedBy"] == f"matview run (pid {process.pid})" and result["file"] == str(spec)
        stored, wanted = total_r1(dsn)
        assert stored == wanted, "the command returned before the view held the new row"
    # Each handed refresh is the run's own: counted once in its metrics, none lost, none doubled.
    assert successes(port) == handed_before + 3

    human = matview_refresh(dsn, "--control-socket", str(sock), str(spec))
    assert human.returncode == 0, human.stderr
    assert f"by: matview run (pid {process.pid})" in human.stdout and "public.sales_by_region: success" in human.stdout

    # Asked to refresh here, the command does, and the run counts nothing.
    add_sale(dsn, 1004)
    here = matview_refresh(dsn, "--json", "--in-process", "--control-socket", str(sock), str(spec))
    assert here.returncode == 0, here.stderr
    [result] = json.loads(here.stdout)
    assert result["result"] == "success" and "refreshedBy" not in result
    assert total_r1(dsn)[0] == total_r1(dsn)[1]
    assert successes(port) == handed_before + 4


def test_what_the_run_cannot_vouch_for_is_refreshed_in_process(dsn: str, serving: Any, tmp_path: Path) -> None:
    spec, sock, port, _ = serving
    handed_before = successes(port)
    copy = tmp_path / "copy.yaml"
    copy.write_text(spec.read_text())
    edited = spec.read_text() + "# an edit the run has not loaded yet\n"
    # why: (the DSN given, extra flags, the file named, the file's new text)
    cases: dict[str, tuple[str, list[str], Path, str | None]] = {
        "another database (the same one named otherwise)": (
            dsn + ("&" if "?" in dsn else "?") + "application_name=other",
            [],
            spec,
            None,
        ),
        "a file it does not serve": (dsn, [], copy, None),
        "a mode override": (dsn, ["--mode", "Full"], spec, None),
        "a file changed since it loaded it": (dsn, [], spec, edited),
    }
    for sale_id, (why, (given_dsn, flags, file, new_text)) in enumerate(cases.items(), start=2001):
        if new_text is not None:
            file.write_text(new_text)
        add_sale(dsn, sale_id)
        done = matview_refresh(given_dsn, "--json", "--control-socket", str(sock), *flags, str(file))
        assert done.returncode == 0, (why, done.stderr)
        [result] = json.loads(done.stdout)
        assert result["result"] == "success" and "refreshedBy" not in result, why
        stored, wanted = total_r1(dsn)
        assert stored == wanted, why
    assert successes(port) == handed_before  # the run refreshed none of them


def test_a_run_that_stops_answering_is_not_waited_for(dsn: str, tmp_path: Path) -> None:
    """A socket that accepts, then closes without results (a run killed mid-refresh): the command refreshes in
    process and says so; a stale socket file (nobody listening) is the quiet, usual case."""
    create_sales(dsn)
    spec = tmp_path / "sales.yaml"
    spec.write_text(to_yaml(document("sales-by-region", "shop", query=QUERY, indexes=[{"columns": ["region"]}])))
    applied = subprocess.run(
        [sys.executable, "-m", "matview.cli", "apply", "--dsn", dsn, str(spec)], capture_output=True, text=True
    )
    assert applied.returncode == 0, applied.stderr
    sock = tmp_path / "run.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    listener.listen()
    requests: list[dict[str, Any]] = []

    def accept_then_vanish() -> None:
        conn, _ = listener.accept()
        with conn:
            requests.append(json.loads(conn.makefile("rb").readline()))
            conn.sendall(b'{"accepted": 1, "deadlineSeconds": 30}\n')

    answering = threading.Thread(target=accept_then_vanish)
    answering.start()
    add_sale(dsn, 3001)
    done = matview_refresh(dsn, "--json", "--control-socket", str(sock), str(spec))
    answering.join()
    listener.close()
    assert done.returncode == 0, done.stderr
    assert "stopped answering" in done.stderr and "refreshing here" in done.stderr
    [result] = json.loads(done.stdout)
    assert result["result"] == "success" and "refreshedBy" not in result
    assert requests == [{"refresh": [str(spec.resolve())], "database": identity_of(dsn)}]
    assert total_r1(dsn)[0] == total_r1(dsn)[1]

    add_sale(dsn, 3002)  # the socket file is left behind, nobody listens: quiet
    stale = matview_refresh(dsn, "--json", "--control-socket", str(sock), str(spec))
    assert stale.returncode == 0 and stale.stderr == "", stale.stderr
    assert total_r1(dsn)[0] == total_r1(dsn)[1]


def identity_of(dsn: str) -> str | None:
    return control.database_identity(argparse.Namespace(dsn=dsn, dsn_file=None, embedded_dir=".matview/pgdata"))


def ask_raw(sock: Path, payload: bytes) -> list[dict[str, Any]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(30)
        client.connect(str(sock))
        with contextlib.suppress(OSError):  # the run may close before reading all of an oversized request
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
        return [json.loads(line) for line in client.makefile("rb")]


def test_hostile_requests_are_declined_and_the_run_goes_on(dsn: str, serving: Any) -> None:
    spec, sock, port, process = serving
    identity = identity_of(dsn)
    hostile: dict[str, bytes] = {
        "not JSON": b"refresh everything\n",
        "not an object": b"[1, 2]\n",
        "extra keys": json.dumps({"refresh": [str(spec)], "database": identity, "sql": "DROP"}).encode() + b"\n",
        "no files": json.dumps({"refresh": [], "database": identity}).encode() + b"\n",
        "relative path": json.dumps({"refresh": ["specs/sales.yaml"], "database": identity}).encode() + b"\n",
        "traversal to a file it does not serve": json.dumps(
            {"refresh": [str(spec.parent / ".." / ".." / "etc" / "passwd")], "database": identity}
        ).encode()
        + b"\n",
        "a number as files": json.dumps({"refresh": 7, "database": identity}).encode() + b"\n",
        "too many files": json.dumps({"refresh": ["/x"] * (control.MAX_FILES + 1), "database": identity}).encode()
        + b"\n",
        "oversized": b'{"refresh": ["/' + b"a" * (2 * control.MAX_REQUEST_BYTES) + b'"]}\n',
        "wrong database": json.dumps({"refresh": [str(spec)], "database": "0" * 64}).encode() + b"\n",
        "invalid UTF-8": b'{"refresh": ["/\xff"], "database": "x"}\n',
        "nested deeper than a JSON parser goes": b"[" * (control.MAX_REQUEST_BYTES - 2) + b"\n",
    }
    for why, payload in hostile.items():
        answers = ask_raw(sock, payload)
        assert len(answers) == 1 and "declined" in answers[0], (why, answers)
    before = successes(port)
    [accepted, results] = ask_raw(sock, json.dumps({"refresh": [str(spec)], "database": identity}).encode() + b"\n")
    assert accepted["accepted"] == 1 and results["results"][0]["result"] == "success"
    assert successes(port) == before + 1
    assert process.poll() is None


def test_a_run_killed_during_a_handed_refresh_leaves_the_command_to_refresh_itself(dsn: str, serving: Any) -> None:
    """The run takes the refresh, then dies (SIGKILL) while its refresh waits for a lock: the command notices
    the closed socket, refreshes in process once the lock is free, and the view holds every row."""
    spec, sock, _, process = serving
    add_sale(dsn, 4001)
    with psycopg.connect(dsn) as blocker:
        blocker.execute("LOCK TABLE public.sales IN ACCESS EXCLUSIVE MODE")
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        asking = ["refresh", "--dsn", dsn, "--json", "--control-socket", str(sock), str(spec)]
        command = subprocess.Popen(
            [sys.executable, "-m", "matview.cli", *asking],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )

        def waiting_backends() -> list[int]:
            with psycopg.connect(dsn, autocommit=True) as conn:
                rows = conn.execute(
                    "SELECT pid FROM pg_catalog.pg_locks WHERE NOT granted AND relation = 'public.sales'::regclass"
                ).fetchall()
            return [pid for (pid,) in rows]

        wait_for(lambda: bool(waiting_backends()), "the run's handed refresh to wait for the lock")
        orphans = waiting_backends()
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        # A killed client's backend waiting for a lock would go on to refresh once it got it, holding the view's
        # lock meanwhile: the command would rightly be skipped as busy. Ending it makes the outcome one.
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_catalog.pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (orphans,))
            wait_for(
                lambda: (
                    admin.execute(
                        "SELECT count(*) = 0 FROM pg_catalog.pg_stat_activity WHERE pid = ANY(%s)", (orphans,)
                    ).fetchone()
                    == (True,)
                ),
                "the killed run's waiting backend to end",
            )
        blocker.rollback()
    output, errors = command.communicate(timeout=300)
    assert command.returncode == 0, errors
    assert "stopped answering" in errors and "refreshing here" in errors
    [result] = json.loads(output)
    assert result["result"] == "success" and "refreshedBy" not in result
    stored, wanted = total_r1(dsn)
    assert stored == wanted


def test_a_second_run_on_the_same_socket_leaves_it_to_the_first(dsn: str, serving: Any, tmp_path: Path) -> None:
    spec, sock, _, process = serving
    second = start_run(dsn, "--metrics-port", "0", "--control-socket", str(sock), str(spec.parent))
    try:
        assert second.stdout is not None
        for line in second.stdout:
            if "another matview run listens on" in line:
                break
        else:
            raise AssertionError("the second run never said it leaves the socket to the first")
        add_sale(dsn, 5001)
        done = matview_refresh(dsn, "--json", "--control-socket", str(sock), str(spec))
        [result] = json.loads(done.stdout)
        assert result["refreshedBy"] == f"matview run (pid {process.pid})"
        assert total_r1(dsn)[0] == total_r1(dsn)[1]
    finally:
        second.send_signal(signal.SIGTERM)
        second.communicate(timeout=60)
    assert sock.exists(), "the second run removed the first one's socket"
