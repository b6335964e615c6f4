"""Faults of the operator itself, on the real control plane (issue #11's fault suite, Kubernetes side)."""

from __future__ import annotations

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


def test_the_operator_sigkilled_mid_swap_recovers(control_plane: ControlPlane, dsn: str, tmp_path: Path) -> None:
    ns = namespace(control_plane, "e2e-operator-faults")
    bind_secrets(control_plane, ns)
    control_plane.create(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db", "namespace": ns}, "stringData": {"uri": dsn}}
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SETUP)
    body = mv("events-by-kind", ns, refresh={"interval": "2s", "mode": "Swap"})
    body["spec"].update(query=QUERY, indexes=[{"columns": ["kind"], "unique": True}])
    status, created = control_plane.request("POST", MV_PATH.format(ns=ns), body)
    assert status == 201, created
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
        first.communicate(timeout=10)
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
