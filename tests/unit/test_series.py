"""The per-view families expose exactly what prometheus_client's own metrics expose for the same updates."""

from __future__ import annotations

import random
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from matview.observe import metrics  # noqa: F401 - switches _created samples off, as the operator runs
from matview.observe.series import MASK_WORDS, MAX_COLUMNS, Families, Family

BUCKETS = (0.1, 0.5, 1, 5)


def test_the_exposition_equals_prometheus_clients_for_the_same_updates() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    families = Families(ours)
    pairs: list[tuple[Family, Any]] = [
        (
            families.add("counter", "t_refreshes_total", "Refreshes.", ["namespace", "name", "mode"]),
            Counter("t_refreshes_total", "Refreshes.", ["namespace", "name", "mode"], registry=theirs),
        ),
        (
            families.add("gauge", "t_rows", "Rows.", ["namespace", "name"]),
            Gauge("t_rows", "Rows.", ["namespace", "name"], registry=theirs),
        ),
        (
            families.add("histogram", "t_duration_seconds", "Durations.", ["namespace", "name", "mode"], BUCKETS),
            Histogram(
                "t_duration_seconds", "Durations.", ["namespace", "name", "mode"], buckets=BUCKETS, registry=theirs
            ),
        ),
        (
            families.add("gauge", "t_size_bytes", "Sizes.", ["namespace", "name", "component"]),
            Gauge("t_size_bytes", "Sizes.", ["namespace", "name", "component"], registry=theirs),
        ),
    ]
    rng = random.Random(7)
    for _ in range(2_000):
        family, metric = rng.choice(pairs)
        namespace, name = rng.choice(["a", "b"]), f"v{rng.randrange(6)}"
        values = (namespace, name, rng.choice(["Concurrent", "Swap", "Full"]))[: len(family.labelnames)]
        action = rng.random()
        one_step = rng.random() < 0.5  # family.set(values, v) and kin, as the refresh's record uses them
        if action < 0.05:  # a deleted view: all its series go, in every family (the rows are shared)
            for one_family, one_metric in pairs:
                one_family.remove_by_labels({"namespace": namespace, "name": name})
                one_metric.remove_by_labels({"namespace": namespace, "name": name})
        elif action < 0.07 and len(values) == 3:  # one label value's series of one family, in every row
            family.remove_by_labels({"mode" if "mode" in family.labelnames else "component": values[2]})
            metric.remove_by_labels({"mode" if "mode" in metric._labelnames else "component": values[2]})
        elif action < 0.1:  # a series removed, then changed through a handle taken before
            handle = family.labels(*values)
            family.remove_by_labels(dict(zip(family.labelnames, values, strict=True)))
            metric.remove_by_labels(dict(zip(family.labelnames, values, strict=True)))
            assert family.kind == "histogram" or handle.get() == 0.0
            if family.kind == "histogram":
                handle.observe(1)
                metric.labels(*values).observe(1)
            else:
                handle.inc(1)
                metric.labels(*values).inc(1)
        elif family.kind == "counter":
            amount = rng.choice([0, 1, 2.5])
            if one_step:
                family.inc(values, amount)
            else:
                family.labels(*values).inc(amount)
            metric.labels(*values).inc(amount)
        elif family.kind == "gauge":
            value = rng.uniform(-5, 5)
            if one_step and rng.random() < 0.3:  # a timestamp learnt elsewhere: never lowers the gauge
                family.raise_to(values, value)
                metric.labels(*values).set(max(value, metric.labels(*values)._value.get()))
            else:
                if one_step:
                    family.set(values, value)
                else:
                    family.labels(*values).set(value)
                metric.labels(*values).set(value)
        else:
            value = rng.choice([0.05, 0.1, 0.3, 1, 5, 7, 100])
            if one_step:
                family.observe(values, value)
            else:
                family.labels(*values).observe(value)
            metric.labels(*values).observe(value)
    assert sorted(generate_latest(ours).decode().splitlines()) == sorted(generate_latest(theirs).decode().splitlines())


def test_bad_label_counts_and_negative_increments_are_refused() -> None:
    families = Families(CollectorRegistry())
    family = families.add("counter", "t_total", "T.", ["namespace", "name"])
    with pytest.raises(ValueError, match="2 label values expected"):
        family.labels("only-one")
    with pytest.raises(ValueError, match="only go up"):
        family.labels("a", "b").inc(-1)
    with pytest.raises(ValueError, match="2 label values expected"):
        family.inc(("a", "b", "c"))
    with pytest.raises(ValueError, match="only go up"):
        family.inc(("a", "b"), -1)
    assert family.labels("a", "b").get() == 0.0, "refused changes change nothing"
    with pytest.raises(ValueError, match="labels start with namespace, name"):
        families.add("gauge", "t_other", "T.", ["name", "namespace"])


def test_unbounded_label_values_are_refused_not_grown_without_end() -> None:
    family = Families(CollectorRegistry()).add("counter", "t_total", "T.", ["namespace", "name", "reason"])
    for number in range(MAX_COLUMNS):
        family.labels("a", "b", f"reason-{number}").inc()
    with pytest.raises(ValueError, match="small fixed sets"):
        family.labels("a", "b", "one-too-many")
    assert family.labels("a", "b", "reason-0").get() == 1.0  # the ones before keep their numbers


def test_a_view_costs_one_row_of_doubles() -> None:
    """Every series of a view, in every family, lives in one array: a view with a score of series holds about a
    double per number, not an object per series."""
    families = Families(CollectorRegistry())
    counters = families.add("counter", "t_total", "T.", ["namespace", "name", "result"])
    gauge = families.add("gauge", "t_rows", "T.", ["namespace", "name"])
    histogram = families.add("histogram", "t_seconds", "T.", ["namespace", "name"], BUCKETS)
    for view in range(100):
        for result in ("success", "failure", "skipped"):
            counters.labels("ns", f"v{view}", result).inc()
        gauge.labels("ns", f"v{view}").set(view)
        histogram.labels("ns", f"v{view}").observe(0.3)
    assert len(families._rows) == 100
    row = families._rows[("ns", "v7")]
    assert len(row) == MASK_WORDS + 3 + 1 + len(BUCKETS) + 2
    assert gauge.labels("ns", "v7").get() == 7.0
