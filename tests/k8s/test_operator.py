"""Operator behaviour through the Kubernetes API contract (kmock) and a real PostgreSQL."""

from __future__ import annotations

from typing import Any

import psycopg

from tests.k8s.conftest import Cluster, eventually

QUERY = "SELECT region, sum(amount) AS total FROM public.sales GROUP BY region"


def setup_sales(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE public.sales (id int PRIMARY KEY, region text, amount int);"
            "INSERT INTO public.sales SELECT g, 'r' || (g % 3), g FROM generate_series(1, 100) g"
        )


def spec(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "query": QUERY,
        "indexes": [{"columns": ["region"], "unique": True}],
        "database": {"secretRef": {"name": "db"}},
        "deletionPolicy": "Delete",
    }
    body.update(changes)
    return body


def exists(dsn: str, name: str = "sales_by_region") -> bool:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT 1 FROM pg_matviews WHERE matviewname = %s", (name,)).fetchone() is not None


async def test_create_reconciles_into_postgresql_and_reports_ready(cluster: Cluster, operator: Any, dsn: str) -> None:
    setup_sales(dsn)
    await cluster.put_secret("db", {"uri": dsn})
    await cluster.create_view("sales-by-region", spec())
    ready = await eventually(lambda: cluster.condition("sales-by-region", "Ready"), "Ready condition")
    assert ready["status"] == "True", ready
    assert ready["reason"] == "Reconciled"
    assert exists(dsn)
    view = await cluster.get_view("sales-by-region")
    assert view is not None
    assert view["status"]["observedGeneration"] == 1
    assert view["status"]["relation"] == "public.sales_by_region"
    assert "matview.dev/finalizer" in view["metadata"]["finalizers"]
