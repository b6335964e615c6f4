"""Faults of the operator itself, on the real control plane (issue #11's fault suite, Kubernetes side)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import psycopg

from tests.e2e.conftest import ControlPlane
from tests.e2e.test_e2e import MV_PATH, bind_secrets, condition, mv, namespace, start_operator, stop_operator, wait_for

SETUP = """
CREATE TABLE public.ctl (slow_seconds float NOT NULL);
INSERT INTO public.ctl VALUES (0);
CREATE FUNCTION public.pause() RETURNS int LANGUAGE sql VOLATILE AS
  'SELECT 1 FROM (SELECT pg_sleep(slow_seconds) FROM public.ctl) s';
CREATE TABLE public.events (id int PRIMARY KEY, kind text NOT NULL);
INSERT INTO public.events SELECT g, 'k' || (g % 7) FROM generate_series(1, 700) g;
"""
QUERY = "SELECT kind, count(*) AS n FROM public.events, (SELECT public.pause() AS p) s GROUP BY kind"


def building(dsn: str) -> set[int]:
    """Server processes running a build for the operator right now."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'matview-operator' "
            "AND state = 'active' AND query ~* 'create materialized view'"
        ).fetchall()
        return {int(r[0]) for r in rows}


def fresh(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        expected = conn.execute("SELECT kind, count(*) FROM public.events GROUP BY kind ORDER BY kind").fetchall()
        try:
            return conn.execute("SELECT kind, n FROM public.events_by_kind ORDER BY kind").fetchall() == expected
        except psycopg.Error:
            return False


def events_view(control_plane: ControlPlane, dsn: str, name: str, refresh: dict[str, str]) -> str:
    """A namespace with the Secret (and the right to read it), the workload, and the view; returns the namespace."""
    ns = namespace(control_plane, name)
    bind_secrets(control_plane, ns)
    control_plane.create(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db", "namespace": ns}, "stringData": {"uri": dsn}}
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SETUP)
    body = mv("events-by-kind", ns, refresh=refresh)
    body["spec"].update(query=QUERY, indexes=[{"columns": ["kind"], "unique": True}])
    status, created = control_plane.request("POST", MV_PATH.format(ns=ns), body)
    assert status == 201, created
    return ns


def test_the_operator_sigkilled_mid_swap_recovers(control_plane: ControlPlane, dsn: str, tmp_path: Path) -> None:
    ns = events_view(control_plane, dsn, "e2e-operator-faults", {"interval": "2s", "mode": "Swap"})
    first, _ = start_operator(control_plane, tmp_path, ns)
    second: subprocess.Popen[str] | None = None
    try:
        wait_for(
            lambda: (c := condition(control_plane, ns, "events-by-kind", "Ready")) and c["status"] == "True", "Ready"
        )
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE public.ctl SET slow_seconds = 30; INSERT INTO public.events VALUES (1000, 'k-new')")
        orphans = wait_for(lambda: building(dsn), "a Swap build in flight")
        first.kill()
        first.wait(timeout=10)
        killed = time.monotonic()
        second, _ = start_operator(control_plane, tmp_path, ns)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE public.ctl SET slow_seconds = 0")  # only the orphan keeps sleeping
        wait_for(lambda: not building(dsn) & orphans, "the dead operator's build to stop", 15)
        orphan_seconds = time.monotonic() - killed
        wait_for(lambda: fresh(dsn), "the view to be fresh under the new operator", 2 + 60)
        assert orphan_seconds < 10
        with psycopg.connect(dsn) as conn:
            leftovers = conn.execute(
                "SELECT count(*) FROM pg_class WHERE relname ~ '_mv_(staging|retired)$'"
            ).fetchone()
        assert leftovers == (0,)
        ready = condition(control_plane, ns, "events-by-kind", "Ready")
        assert ready is not None and ready["status"] == "True"
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                print(stop_operator(process)[-3000:])


def refresh_runs(dsn: str, relation: str) -> int:
    """Refreshes the engine recorded in the view's marker (it counts even when status cannot be written)."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT obj_description(%s::regclass, 'pg_class')", (relation,)).fetchone()
    return int(json.loads(row[0])["state"]["runs"]) if row and row[0] else 0


def test_the_apiserver_unavailable_for_30_seconds(control_plane: ControlPlane, dsn: str, tmp_path: Path) -> None:
    ns = events_view(control_plane, dsn, "e2e-apiserver-outage", {"interval": "2s"})
    operator, _ = start_operator(control_plane, tmp_path, ns)
    path = MV_PATH.format(ns=ns) + "/events-by-kind"
    try:
        wait_for(
            lambda: (c := condition(control_plane, ns, "events-by-kind", "Ready")) and c["status"] == "True", "Ready"
        )
        control_plane.stop_apiserver()
        before = refresh_runs(dsn, "public.events_by_kind")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO public.events VALUES (2000, 'k-outage')")
        time.sleep(30)
        during = refresh_runs(dsn, "public.events_by_kind") - before
        assert fresh(dsn), "the view kept being refreshed while the API was away"
        control_plane.start_apiserver()
        back = time.time()

        def status_current() -> bool:
            code, found = control_plane.request("GET", path)
            stamp = (found or {}).get("status", {}).get("lastSuccessfulRefreshTime", "")
            return code == 200 and stamp >= time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(back))

        wait_for(status_current, "status updates to resume after the outage", 2 + 60)
        print(f"status current again {time.time() - back:.1f} s after the API came back")
        patch = {"spec": {"indexes": [{"columns": ["kind"], "unique": True}, {"columns": ["n"]}]}}
        code, _ = control_plane.request("PATCH", path, patch, content_type="application/merge-patch+json")
        assert code == 200

        def edit_applied() -> bool:
            with psycopg.connect(dsn) as conn:
                row = conn.execute("SELECT count(*) FROM pg_indexes WHERE tablename = 'events_by_kind'").fetchone()
            return row == (2,)

        edited = time.monotonic()
        # kopf re-establishes its watch with backoff (at most 10 s apart); measured 3 s here, bounded loosely.
        wait_for(edit_applied, "an edit after the outage to be applied (the watch came back)", 120)
        print(f"edit applied {time.monotonic() - edited:.1f} s after it was made")
        assert during >= 5, f"only {during} refreshes in 30 s without the API"
        assert operator.poll() is None, "the operator survived the outage"
    finally:
        if control_plane.apiserver is not None and control_plane.apiserver.poll() is not None:
            control_plane.start_apiserver()
        print(stop_operator(operator)[-3000:])
