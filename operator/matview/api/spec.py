"""The validated, typed form of a MaterializedView document.

Only ``matview.api.validation`` builds these objects, after every field has been
checked; the rest of the package can therefore trust them (names are within
PostgreSQL's limits, SQL fragments are parsed ``CheckedSQL``, durations are
positive seconds).
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from matview.api.sqltext import CheckedSQL
from matview.constants import MAX_IDENTIFIER_BYTES


class RefreshMode(enum.StrEnum):
    """The one vocabulary of refresh modes: spec, CLI choices, metrics labels and the mode policy."""

    AUTO = "Auto"
    CONCURRENT = "Concurrent"
    FULL = "Full"
    SWAP = "Swap"
    INCREMENTAL = "Incremental"

    @classmethod
    def runnable(cls) -> tuple[RefreshMode, ...]:
        """The modes a refresh actually runs (Auto only chooses among them)."""
        return (cls.CONCURRENT, cls.FULL, cls.SWAP, cls.INCREMENTAL)


class Storage(enum.StrEnum):
    """What the stored relation is. A table takes DML, which incremental refresh needs."""

    MATERIALIZED_VIEW = "MaterializedView"
    TABLE = "Table"

    @property
    def relkind(self) -> str:
        """pg_class.relkind of the stored relation."""
        return "r" if self is Storage.TABLE else "m"


class PartitionBy(enum.StrEnum):
    """How a partitioned view's rows are split."""

    RANGE = "Range"
    """By a date or timestamp column, one partition per period (a week, a day, a month)."""
    LIST = "List"
    """By a column's values, one partition per value."""


class PartitionPeriod(enum.StrEnum):
    """The span of one range partition; its value is the unit date_trunc aligns the bounds to."""

    DAY = "Day"
    WEEK = "Week"
    MONTH = "Month"

    @property
    def unit(self) -> str:
        """date_trunc's unit: weeks start on Monday (ISO), months on their first day."""
        return self.value.lower()


@dataclass(frozen=True)
class PartitionSource:
    """A table the query reads whose rows only reach the view's rows of the same period: a row with ``column``
    in a period makes (or changes) only view rows whose partition column is in that period. A partition's
    rebuild reads only that period of it."""

    schema: str
    table: str
    column: str

    @property
    def relation(self) -> tuple[str, str]:
        return (self.schema, self.table)


@dataclass(frozen=True)
class Retention:
    """How much of a range-partitioned view is kept: the current period and what lies ``count`` days, weeks
    or months before it (``26w``); partitions wholly older are detached and dropped after each refresh."""

    count: int
    unit: Literal["d", "w", "mo"]

    @property
    def text(self) -> str:
        return f"{self.count}{self.unit}"


@dataclass(frozen=True)
class PartitioningSpec:
    """A partitioned view (storage Table): which column splits its rows and how."""

    column: str
    by: PartitionBy
    period: PartitionPeriod | None = None
    """Range only: the span of one partition."""
    ahead: int = 0
    """Range only: empty partitions made beyond the newest period of the data (or the current one)."""
    sources: tuple[PartitionSource, ...] = ()
    """Range only: with them, a full refresh rebuilds a partition at a time, each reading its period of them."""
    retain: Retention | None = None
    """Range only: the window kept; older partitions are retired after a refresh (None: all are kept)."""

    @property
    def shape(self) -> list[object]:
        """What the stored relation is built from: a change rebuilds the view."""
        return [self.column, self.by.value, self.period.value if self.period else None]


#: The modes each storage kind can run (Auto chooses among them).
MODES_BY_STORAGE = {
    Storage.MATERIALIZED_VIEW: frozenset(
        {RefreshMode.AUTO, RefreshMode.CONCURRENT, RefreshMode.FULL, RefreshMode.SWAP}
    ),
    Storage.TABLE: frozenset({RefreshMode.AUTO, RefreshMode.SWAP, RefreshMode.INCREMENTAL}),
}


IndexMethod = Literal["btree", "hash", "gin", "gist", "brin"]
DeletionPolicy = Literal["Retain", "Delete"]


@dataclass(frozen=True)
class IndexSpec:
    """An index on the materialized view."""

    columns: tuple[str, ...]
    unique: bool = False
    where: CheckedSQL | None = None
    method: IndexMethod = "btree"
    name: str | None = None
    """The user's name, or None for a deterministic one (see ``index_name``)."""

    @property
    def definition_digest(self) -> str:
        """Identifies the index's shape; stored in its marker to spot changed definitions."""
        shape = [list(self.columns), self.unique, self.where.text if self.where else None, self.method]
        return hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:8]

    @property
    def usable_for_concurrent_refresh(self) -> bool:
        """REFRESH ... CONCURRENTLY needs a unique btree-like index on plain columns without WHERE."""
        return self.unique and self.where is None


@dataclass(frozen=True)
class SupportingIndexSpec(IndexSpec):
    """An index on a base table that the view's query reads."""

    table_schema: str = "public"
    table: str = ""


@dataclass(frozen=True)
class RefreshSpec:
    """When and how the view is refreshed (the engine lives in matview.refresh)."""

    interval_seconds: float | None = None
    schedule: str | None = None
    time_zone: str | None = None
    mode: RefreshMode = RefreshMode.AUTO
    timeout_seconds: float = 300.0
    """The CRD's default of spec.refresh.timeout (5m); validation reads the CRD and falls back to this."""
    lock_timeout_seconds: float = 5.0
    only_if_changed: bool = False
    suspend: bool = False
    target_lag_seconds: float | None = None
    """Declared freshness (incremental views): refresh when waiting longer would leave a change older than this."""


@dataclass(frozen=True)
class KeySource:
    """A table the query reads whose rows map to view keys through these columns (filtered and captured)."""

    schema: str
    table: str
    columns: tuple[str, ...]
    append_only_column: str | None = None
    """Declared append-only (``appendOnly.column``): new rows come by INSERT with this integer column increasing
    (an identity or serial column), so INSERTs are not captured; each refresh reads the rows above the last
    one's watermark instead (``refresh.ranges``). UPDATE, DELETE and TRUNCATE are still captured."""

    @property
    def relation(self) -> tuple[str, str]:
        return (self.schema, self.table)


class CaptureMethod(enum.StrEnum):
    """How writes to an incremental view's sources reach its change log."""

    TRIGGERS = "Triggers"
    """Statement triggers, in the writer's own transaction (the default: no server setting needed)."""
    LOGICAL_DECODING = "LogicalDecoding"
    """A logical replication slot (pgoutput) and a publication of the sources, read by each refresh."""


@dataclass(frozen=True)
class IncrementalSpec:
    """Key-based incremental refresh: the view's rows are grouped by key_columns, and a row of a source
    with key K can only change the view's rows with key K."""

    key_columns: tuple[str, ...]
    sources: tuple[KeySource, ...]
    full_rebuild_ratio: float | None = None
    """An override: above this share of changed keys (of the view's rows) Auto rebuilds in full. None (the
    default): Auto chooses from this view's measured durations (refresh.policy.choose_incremental)."""
    verify_interval_seconds: float | None = None
    """How often a refresh also compares the stored rows with a full recompute (None: never)."""
    rebuild_on_mismatch: bool = False
    live_view: bool = False
    """Keep ``<name>_live``: the stored rows plus the pending keys recomputed, fresh to the last commit."""
    capture: CaptureMethod = CaptureMethod.TRIGGERS

    @property
    def digest(self) -> str:
        """Identifies the declaration: a change rebuilds the view and re-installs change capture."""
        shape: list[Any] = [list(self.key_columns), [[s.schema, s.table, list(s.columns)] for s in self.sources]]
        if any(s.append_only_column for s in self.sources):  # declarations without one keep their digest
            shape.append([s.append_only_column for s in self.sources])
        return hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Grant:
    role: str
    privileges: tuple[str, ...] = ("SELECT",)


@dataclass(frozen=True)
class SecretRef:
    name: str
    key: str = "uri"


@dataclass(frozen=True)
class MaterializedView:
    """One validated MaterializedView resource."""

    namespace: str
    resource_name: str
    schema: str
    name: str
    query: CheckedSQL
    indexes: tuple[IndexSpec, ...] = ()
    supporting_indexes: tuple[SupportingIndexSpec, ...] = ()
    refresh: RefreshSpec = RefreshSpec()
    grants: tuple[Grant, ...] = ()
    deletion_policy: DeletionPolicy = "Retain"
    secret_ref: SecretRef | None = None
    generation: int | None = None
    search_path: tuple[str, ...] = ()
    """Schemas searched between pg_catalog and pg_temp while the query and predicates are compiled."""
    run_as_role: str | None = None
    """The role that builds and owns the view (SET ROLE), so the query runs with that role's rights."""
    storage: Storage = Storage.MATERIALIZED_VIEW
    incremental: IncrementalSpec | None = None
    partitioning: PartitioningSpec | None = None

    @property
    def relkind(self) -> str:
        """pg_class.relkind of the stored relation: a partitioned table is 'p'."""
        return "p" if self.partitioning is not None else self.storage.relkind

    @property
    def definition_digest(self) -> str:
        """Identifies what the stored view was built from: the query, and the name resolution and role
        it was compiled under (a change to either rebuilds it). Equal to the query's digest when neither
        is set, so views built before these fields existed are not rebuilt."""
        if not self.search_path and self.run_as_role is None and self.storage is Storage.MATERIALIZED_VIEW:
            return self.query.digest
        shape: list[object] = [self.query.text, list(self.search_path), self.run_as_role]
        if self.storage is not Storage.MATERIALIZED_VIEW:
            shape.append(self.storage.value)
        if self.partitioning is not None:
            shape.append(self.partitioning.shape)
        return hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:16]

    @property
    def owner(self) -> str:
        """The identity written into ownership markers: ``namespace/name`` of the resource."""
        return f"{self.namespace}/{self.resource_name}"

    @property
    def relation(self) -> str:
        """Human-readable ``schema.name`` (for messages and status, never for SQL)."""
        return f"{self.schema}.{self.name}"

    def index_name(self, index: IndexSpec) -> str:
        """The index's name: the user's, or ``<table>_<columns>_<digest>`` cut to 63 bytes."""
        if index.name:
            return index.name
        table = index.table if isinstance(index, SupportingIndexSpec) else self.name
        return deterministic_index_name(table, index)


def deterministic_index_name(table: str, index: IndexSpec) -> str:
    """A readable name that always fits NAMEDATALEN and changes when the definition does.

    The digest suffix makes a changed definition a *new* index: it is built
    beside the old one and the old one dropped afterwards, so a rebuild never
    leaves the view without an index.
    """
    suffix = f"_{'key' if index.unique else 'idx'}_{index.definition_digest}"
    stem = "_".join((table, *index.columns))
    budget = MAX_IDENTIFIER_BYTES - len(suffix.encode())
    return truncate_utf8(stem, budget) + suffix


def truncate_utf8(text: str, max_bytes: int) -> str:
    """Cut text to at most max_bytes of UTF-8 without splitting a character."""
    encoded = text.encode()
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max_bytes].decode(errors="ignore")
