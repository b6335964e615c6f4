"""Per-view metric families that hold plain numbers, exposed through a collector at scrape time.

prometheus_client makes every labelled series an object of its own: the metric wrapper with its name, help
and label lists, and a value with a lock for each number (a histogram: one per bucket). A view has about
sixty such numbers, so at 3,000 views the series held 82 MiB, 28 KiB per view, the largest of the operator's
per-view structures (``benchmarks/scale.py --memory``). A dict from label values to a float per family brought
that to 4.5 KiB per view: still a key tuple, a dict slot and a float object for each of about forty series.

Here every view is one row: a single ``array('d')`` of raw doubles holding all of its series of all families
(a histogram's cell is its bucket counts and its sum), found by the row's labels (namespace, name). The other
labels' values (mode, result, reason, component: small fixed sets) each get a column, at a fixed offset in
every row, the first time any view uses them; the first words of a row are the bits saying which columns exist
for it. About 0.8 KiB per view. The families' metric objects are built only when scraped, and the exposition is
the same as prometheus_client's for the same series.
"""

from __future__ import annotations

import bisect
import math
import threading
from array import array
from collections.abc import Iterator, Sequence
from typing import Literal

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

Kind = Literal["counter", "gauge", "histogram"]

#: The labels that pick a row: every per-view family starts with them.
ROW_LABELS = ("namespace", "name")

#: The words at the start of a row whose bits say which columns the row has (52 a word, so each stays an
#: integer a double holds exactly): at most this many times 52 label combinations over all families. The label
#: values beyond the row's come from small fixed sets (modes, results, reasons), about 45 combinations today.
MASK_WORDS = 3
_BITS_PER_WORD = 52
MAX_COLUMNS = MASK_WORDS * _BITS_PER_WORD


class Families:
    """The per-view families of one registry: their numbers, one row per view, and their collection."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.families: list[Family] = []
        self._rows: dict[tuple[str, ...], array[float]] = {}
        self._columns: dict[tuple[Family, tuple[str, ...]], int] = {}
        self._offsets: list[int] = []
        """Per column: where its cell starts in a row."""
        self._width = MASK_WORDS
        """The cells' end in a row with every column: the next column starts here."""
        self._lock = threading.Lock()
        registry.register(self)

    def add(
        self, kind: Kind, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float] = ()
    ) -> Family:
        if tuple(labelnames[: len(ROW_LABELS)]) != ROW_LABELS:
            raise ValueError(f"{name}: a per-view family's labels start with {', '.join(ROW_LABELS)}")
        family = Family(self, kind, name, documentation, labelnames, buckets)
        self.families.append(family)
        return family

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.collect()

    # --- the storage, under self._lock ----------------------------------------------------------------------

    def _column(self, family: Family, values: tuple[str, ...]) -> int:
        column = self._columns.get((family, values))
        if column is None:
            if len(self._offsets) >= MAX_COLUMNS:
                raise ValueError(
                    f"{family.name}: more than {MAX_COLUMNS} label combinations beyond {', '.join(ROW_LABELS)}: "
                    "those labels must take values from small fixed sets"
                )
            column = self._columns[(family, values)] = len(self._offsets)
            self._offsets.append(self._width)
            self._width += family.cell
        return column

    def _cell(self, row_key: tuple[str, ...], column: int, cell: int) -> tuple[array[float], int]:
        """The row and the offset of column's cell in it, the column created (at zero) if the row lacks it."""
        row = self._rows.get(row_key)
        if row is None:
            row = self._rows[row_key] = array("d", bytes(8 * MASK_WORDS))
        start = self._offsets[column]
        if len(row) < start + cell:
            row.frombytes(bytes(8 * (start + cell - len(row))))
        if not self._has(row, column):
            self._mark(row, column, present=True)
            for at in range(start, start + cell):
                row[at] = 0.0
        return row, start

    @staticmethod
    def _has(row: array[float], column: int) -> bool:
        word, bit = divmod(column, _BITS_PER_WORD)
        return bool(int(row[word]) >> bit & 1)

    @staticmethod
    def _mark(row: array[float], column: int, present: bool) -> None:
        word, bit = divmod(column, _BITS_PER_WORD)
        mask = int(row[word])
        row[word] = float(mask | 1 << bit if present else mask & ~(1 << bit))

    def _remove(self, family: Family, match: dict[int, str]) -> None:
        """Remove family's series whose label values at these positions match."""
        row_match = {at: value for at, value in match.items() if at < len(ROW_LABELS)}
        column_match = {at - len(ROW_LABELS): value for at, value in match.items() if at >= len(ROW_LABELS)}
        columns = [
            column
            for (owner, values), column in self._columns.items()
            if owner is family and all(values[at] == value for at, value in column_match.items())
        ]
        for row_key in [key for key in self._rows if all(key[at] == value for at, value in row_match.items())]:
            row = self._rows[row_key]
            for column in columns:
                self._mark(row, column, present=False)
            if not any(row[:MASK_WORDS]):
                del self._rows[row_key]

    def _present(self, family: Family) -> list[tuple[tuple[str, ...], list[float]]]:
        """Family's series now: label values and the cell's numbers."""
        columns = [(values, column) for (owner, values), column in self._columns.items() if owner is family]
        found = []
        for row_key, row in self._rows.items():
            for values, column in columns:
                if self._has(row, column):
                    start = self._offsets[column]
                    found.append(((*row_key, *values), row[start : start + family.cell].tolist()))
        return found


class Family:
    """One metric's series by label values. ``labels(...)`` gives a handle to one series, as in
    prometheus_client; the series exists from the first ``labels`` call (at zero) until removed."""

    def __init__(
        self,
        store: Families,
        kind: Kind,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float] = (),
    ) -> None:
        self._store = store
        self.kind, self.name, self.documentation = kind, name, documentation
        self.labelnames = tuple(labelnames)
        self.buckets = (*sorted(buckets), math.inf) if kind == "histogram" else ()
        self.cell = len(self.buckets) + 1 if kind == "histogram" else 1
        """Numbers a series holds: one, or a histogram's count in each bucket (not cumulative) and its sum."""
        self._bucket_labels = [floatToGoString(bound) for bound in self.buckets]  # type: ignore[no-untyped-call]

    def labels(self, *values: str) -> Series:
        key = self._key(values)
        with self._store._lock:
            self._cell_of(key)
        return Series(self, key)

    # ``labels(*values).set(value)`` and its kin in one step: one lock and one look-up, no handle. A refresh
    # records about ten series, after every refresh, on the event loop that hands the lanes their work.

    def set(self, values: tuple[str, ...], value: float) -> None:
        key = self._key(values)
        with self._store._lock:
            row, at = self._cell_of(key)
            row[at] = float(value)

    def inc(self, values: tuple[str, ...], amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: counters only go up")
        key = self._key(values)
        with self._store._lock:
            row, at = self._cell_of(key)
            row[at] += amount

    def raise_to(self, values: tuple[str, ...], value: float) -> None:
        """Set the series to value unless it holds more already (a timestamp learnt from elsewhere)."""
        key = self._key(values)
        with self._store._lock:
            row, at = self._cell_of(key)
            row[at] = max(row[at], float(value))

    def observe(self, values: tuple[str, ...], value: float) -> None:
        key = self._key(values)
        bucket = bisect.bisect_left(self.buckets, value)  # the first bound >= value: buckets are "le"
        with self._store._lock:
            row, at = self._cell_of(key)
            row[at + bucket] += 1
            row[at + self.cell - 1] += value

    def _cell_of(self, key: tuple[str, ...]) -> tuple[array[float], int]:
        """The series' row and cell offset, created at zero if missing; under the store's lock."""
        store = self._store
        return store._cell(key[: len(ROW_LABELS)], store._column(self, key[len(ROW_LABELS) :]), self.cell)

    def _key(self, values: Sequence[str]) -> tuple[str, ...]:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(self.labelnames)} label values expected, got {len(values)}")
        return tuple(str(value) for value in values)

    def remove_by_labels(self, labels: dict[str, str]) -> None:
        """Remove every series whose labels include these."""
        match = {self.labelnames.index(name): value for name, value in labels.items()}
        with self._store._lock:
            self._store._remove(self, match)

    def collect(self) -> Metric:
        with self._store._lock:
            present = self._store._present(self)
        if self.kind != "histogram":
            kind = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
            family = kind(self.name, self.documentation, labels=self.labelnames)
            for key, (value,) in present:
                family.add_metric(key, value)
            return family
        histogram = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, counts in present:
            cumulative, buckets = 0.0, []
            for label, count in zip(self._bucket_labels, counts, strict=False):
                cumulative += count
                buckets.append((label, cumulative))
            histogram.add_metric(key, buckets, counts[-1])
        return histogram


class Series:
    """One series of a family (a short-lived handle: the numbers live in the family's rows; its changes are the
    family's one-step ones). A series removed since the handle was taken comes back (at zero) when the handle
    changes it."""

    __slots__ = ("family", "key")

    def __init__(self, family: Family, key: tuple[str, ...]) -> None:
        self.family, self.key = family, key

    def inc(self, amount: float = 1.0) -> None:
        self.family.inc(self.key, amount)

    def set(self, value: float) -> None:
        self.family.set(self.key, value)

    def observe(self, value: float) -> None:
        self.family.observe(self.key, value)

    def get(self) -> float:
        family = self.family
        store = family._store
        with store._lock:
            row = store._rows.get(self.key[: len(ROW_LABELS)])
            column = store._columns.get((family, self.key[len(ROW_LABELS) :]))
            if row is None or column is None or not store._has(row, column):
                return 0.0
            return row[store._offsets[column]]
