"""The Grafana dashboard only queries metrics the operator exports; the Argo CD health check reads status right."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import lupa  # a test dependency (pyproject.toml): if it is missing, the suite must fail, not skip

from matview.observe.metrics import RefreshMetrics

ROOT = Path(__file__).resolve().parents[2]


def exported_series() -> set[str]:
    """Every series name the operator's registry can expose (families with their suffixes)."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}
    return {
        family.name + suffix
        for family in RefreshMetrics().registry.collect()
        for suffix in suffixes.get(family.type, [""])
    }


def test_dashboard_queries_name_only_exported_metrics() -> None:
    dashboard = json.loads((ROOT / "manifests/monitoring/dashboards/matview.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(expressions) >= 8
    used = {name for expr in expressions for name in re.findall(r"\bmatview_[a-z_]+", expr)}
    assert used, "the dashboard queries no matview metric"
    assert used <= exported_series(), f"not exported: {sorted(used - exported_series())}"
    titles = " ".join(panel["title"] for panel in dashboard["panels"])
    for topic in ("p50 / p95", "Failures by reason", "Staleness", "Rows", "Size"):
        assert topic in titles


def health(obj: dict[str, Any]) -> dict[str, str]:
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute((ROOT / "manifests/argocd/health.lua").read_text())
    return {"status": result["status"], "message": result["message"]}


def obj(generation: int = 2, observed: int | None = 2, **conditions: tuple[str, str]) -> dict[str, Any]:
    status: dict[str, Any] = {
        "conditions": [{"type": t, "status": s, "message": m} for t, (s, m) in conditions.items()]
    }
    if observed is not None:
        status["observedGeneration"] = observed
    return {"metadata": {"generation": generation}, "status": status}


def test_argocd_health() -> None:
    assert health({"metadata": {"generation": 1}})["status"] == "Progressing"
    assert health(obj(Ready=("True", "ok")))["status"] == "Healthy"
    assert health(obj(observed=1, Ready=("True", "ok")))["status"] == "Progressing"
    degraded = health(obj(Ready=("False", "spec.query: bad"), Stalled=("True", "spec.query: bad")))
    assert degraded == {"status": "Degraded", "message": "spec.query: bad"}
    assert health(obj(Ready=("False", "db down"), Reconciling=("True", "db down")))["status"] == "Progressing"
