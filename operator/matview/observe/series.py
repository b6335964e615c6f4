"""Per-view metric families that hold plain numbers, exposed through a collector at scrape time.

prometheus_client makes every labelled series an object of its own: the metric wrapper with its name, help
and label lists, and a value with a lock for each number (a histogram: one per bucket). A view has about
sixty such numbers, so at 3,000 views the series held 82 MiB, 28 KiB per view, the largest of the operator's
per-view structures (``benchmarks/scale.py --memory``). Here a family keeps one dict from label values to a
float (a histogram: a list of bucket counts and the sum) under one lock, and builds the exposition's metric
families only when scraped. The exposition is the same as prometheus_client's for the same series.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterator, Sequence
from typing import Literal

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

Kind = Literal["counter", "gauge", "histogram"]


class Family:
    """One metric's series by label values. ``labels(...)`` gives a handle to one series, as in
    prometheus_client; the series exists from the first ``labels`` call (at zero) until removed."""

    def __init__(
        self, kind: Kind, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float] = ()
    ) -> None:
        self.kind, self.name, self.documentation = kind, name, documentation
        self.labelnames = tuple(labelnames)
        self.buckets = (*sorted(buckets), math.inf) if kind == "histogram" else ()
        self._bucket_labels = [floatToGoString(bound) for bound in self.buckets]  # type: ignore[no-untyped-call]
        self._values: dict[tuple[str, ...], float] = {}
        self._histograms: dict[tuple[str, ...], list[float]] = {}
        """Per series: the count in each bucket (not cumulative), then the sum."""
        self._lock = threading.Lock()

    def labels(self, *values: str) -> Series:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(self.labelnames)} label values expected, got {len(values)}")
        key = tuple(str(value) for value in values)
        with self._lock:
            if self.kind == "histogram":
                self._histograms.setdefault(key, self.empty_histogram())
            else:
                self._values.setdefault(key, 0.0)
        return Series(self, key)

    def empty_histogram(self) -> list[float]:
        """A histogram series at zero: each bucket's count, then the sum."""
        return [0.0] * (len(self.buckets) + 1)

    def remove_by_labels(self, labels: dict[str, str]) -> None:
        """Remove every series whose labels include these."""
        positions = [(self.labelnames.index(name), value) for name, value in labels.items()]
        with self._lock:
            for store in (self._values, self._histograms):
                for key in [key for key in store if all(key[at] == value for at, value in positions)]:
                    del store[key]

    def collect(self) -> Metric:
        with self._lock:
            values = list(self._values.items())
            histograms = [(key, list(counts)) for key, counts in self._histograms.items()]
        if self.kind != "histogram":
            kind = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
            family = kind(self.name, self.documentation, labels=self.labelnames)
            for key, value in values:
                family.add_metric(key, value)
            return family
        histogram = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, counts in histograms:
            cumulative, buckets = 0.0, []
            for label, count in zip(self._bucket_labels, counts, strict=False):
                cumulative += count
                buckets.append((label, cumulative))
            histogram.add_metric(key, buckets, counts[-1])
        return histogram


class Series:
    """One series of a family (a short-lived handle: the number lives in the family)."""

    __slots__ = ("family", "key")

    def __init__(self, family: Family, key: tuple[str, ...]) -> None:
        self.family, self.key = family, key

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"{self.family.name}: counters only go up")
        with self.family._lock:
            self.family._values[self.key] = self.family._values.get(self.key, 0.0) + amount

    def set(self, value: float) -> None:
        with self.family._lock:
            self.family._values[self.key] = float(value)

    def get(self) -> float:
        with self.family._lock:
            return self.family._values.get(self.key, 0.0)

    def observe(self, value: float) -> None:
        family = self.family
        at = bisect.bisect_left(family.buckets, value)  # the first bound >= value: buckets are "le"
        with family._lock:
            counts = family._histograms.setdefault(self.key, family.empty_histogram())
            counts[at] += 1
            counts[-1] += value


class Families:
    """The families of one registry, collected at scrape time."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.families: list[Family] = []
        registry.register(self)

    def add(
        self, kind: Kind, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float] = ()
    ) -> Family:
        family = Family(kind, name, documentation, labelnames, buckets)
        self.families.append(family)
        return family

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.collect()
