"""The per-view gauges follow the view's settings, although track() skips the work when they did not change."""

from __future__ import annotations

from typing import Any

from prometheus_client import generate_latest

from matview.observe.metrics import RefreshMetrics
from matview.observe.series import Family
from tests.helpers import view


def shown(metrics: RefreshMetrics, gauge: Family, name: str = "a") -> float | None:
    return metrics.registry.get_sample_value(gauge.name, {"namespace": "ops", "name": name})


def demand(metrics: RefreshMetrics) -> float | None:
    return metrics.registry.get_sample_value("matview_refresh_demand_per_second")


def test_track_follows_edits_and_a_view_tracked_again_after_forget() -> None:
    metrics = RefreshMetrics()
    hourly = view("a", refresh={"interval": "1h", "timeout": "5m"})
    metrics.track(hourly, 3600)
    assert (shown(metrics, metrics.interval), shown(metrics, metrics.timeout)) == (3600, 300)
    metrics.track(hourly, 3600)  # after every refresh: nothing changed
    assert (shown(metrics, metrics.interval), shown(metrics, metrics.timeout)) == (3600, 300)
    edited = view("a", refresh={"interval": "30s", "timeout": "1m"})
    metrics.track(edited, 30)
    assert (shown(metrics, metrics.interval), shown(metrics, metrics.timeout)) == (30, 60)
    assert demand(metrics) == 1 / 30
    metrics.forget("ops", "a")
    assert shown(metrics, metrics.interval) is None and demand(metrics) == 0
    metrics.track(edited, 30)  # the same settings as before forget: its series come back all the same
    assert (shown(metrics, metrics.interval), shown(metrics, metrics.timeout)) == (30, 60)
    assert demand(metrics) == 1 / 30


def test_incremental_target_lag_follows_edits() -> None:
    metrics = RefreshMetrics()
    spec: dict[str, Any] = {
        "storage": "Table",
        "query": "SELECT id FROM ops.t",
        "indexes": [{"columns": ["id"], "unique": True}],
        "incremental": {"keyColumns": ["id"], "sources": [{"table": "ops.t", "columns": ["id"]}]},
    }
    metrics.track(view("a", **spec, refresh={"targetLag": "5m"}), 60)
    assert shown(metrics, metrics.target_lag) == 300
    metrics.track(view("a", **spec, refresh={"targetLag": "1m"}), 60)
    assert shown(metrics, metrics.target_lag) == 60
    # Made incremental with every gauge's value unchanged: its target-lag series appears all the same.
    metrics.track(view("b", query="SELECT id FROM ops.t"), 60)
    assert shown(metrics, metrics.target_lag, "b") is None
    metrics.track(view("b", **spec), 60)
    assert shown(metrics, metrics.target_lag, "b") == 0


def test_scheduler_gauges_follow_every_change() -> None:
    metrics = RefreshMetrics()
    metrics.scheduler(scheduled=3, running=1, waiting=0, lanes=(2, 4))
    metrics.scheduler(scheduled=3, running=1, waiting=0, lanes=(2, 4))
    metrics.scheduler(scheduled=3, running=2, waiting=5, lanes=(3, 4))
    values = [g._value.get() for g in (metrics.scheduled, metrics.running, metrics.queue_depth, metrics.lanes)]
    assert values == [3, 2, 5, 3]


def test_no_created_samples_are_exposed() -> None:
    """Every counter and histogram would otherwise carry a _created sample, a fifth of each scrape at scale."""
    metrics = RefreshMetrics()
    metrics.track(view("a", refresh={"interval": "1h"}), 3600)
    exposed = generate_latest(metrics.registry).decode()
    assert "matview_refreshes_total{" in exposed and "_created" not in exposed
