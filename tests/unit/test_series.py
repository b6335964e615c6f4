"""The per-view families expose exactly what prometheus_client's own metrics expose for the same updates."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from matview.observe import metrics  # noqa: F401 - switches _created samples off, as the operator runs
from matview.observe.series import Families

BUCKETS = (0.1, 0.5, 1, 5)


def test_the_exposition_equals_prometheus_clients_for_the_same_updates() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    families = Families(ours)
    pairs = [
        (
            families.add("counter", "t_refreshes_total", "Refreshes.", ["namespace", "name", "mode"]),
            Counter("t_refreshes_total", "Refreshes.", ["namespace", "name", "mode"], registry=theirs),
        ),
        (
            families.add("gauge", "t_rows", "Rows.", ["namespace", "name"]),
            Gauge("t_rows", "Rows.", ["namespace", "name"], registry=theirs),
        ),
        (
            families.add("histogram", "t_duration_seconds", "Durations.", ["namespace", "name"], BUCKETS),
            Histogram("t_duration_seconds", "Durations.", ["namespace", "name"], buckets=BUCKETS, registry=theirs),
        ),
    ]
    rng = random.Random(7)
    for _ in range(2_000):
        family, metric = rng.choice(pairs)
        namespace, name = rng.choice(["a", "b"]), f"v{rng.randrange(6)}"
        values = (namespace, name, rng.choice(["Concurrent", "Swap"]))[: len(family.labelnames)]
        action = rng.random()
        if action < 0.05:
            family.remove_by_labels({"namespace": namespace, "name": name})
            metric.remove_by_labels({"namespace": namespace, "name": name})
        elif family.kind == "counter":
            amount = rng.choice([0, 1, 2.5])
            family.labels(*values).inc(amount)
            metric.labels(*values).inc(amount)
        elif family.kind == "gauge":
            value = rng.uniform(-5, 5)
            family.labels(*values).set(value)
            metric.labels(*values).set(value)
        else:
            value = rng.choice([0.05, 0.1, 0.3, 1, 5, 7, 100])
            family.labels(*values).observe(value)
            metric.labels(*values).observe(value)
    assert sorted(generate_latest(ours).decode().splitlines()) == sorted(generate_latest(theirs).decode().splitlines())


def test_bad_label_counts_and_negative_increments_are_refused() -> None:
    family = Families(CollectorRegistry()).add("counter", "t_total", "T.", ["namespace", "name"])
    with pytest.raises(ValueError, match="2 label values expected"):
        family.labels("only-one")
    with pytest.raises(ValueError, match="only go up"):
        family.labels("a", "b").inc(-1)
