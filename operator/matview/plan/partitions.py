"""Partitioned views (spec.partitioning): what a partition is called, which partitions a build's data needs,
and the renames that carry a view's partitions through a swap.

PostgreSQL cannot partition a materialized view, and ``CREATE TABLE … AS`` cannot make a partitioned table,
so a partitioned view is built in three moves inside one transaction: the query's rows into an unlogged
table of the same shape, the partitioned table and the partitions those rows need (read from them, so the
user's query runs once), then the rows routed into it. Which partitions exist depends on the data, so the
planner cannot list them: it gives the executor a ``FromRows`` (a read and a pure function from its rows to
statements), and this module holds both halves.

Every partition is named ``<parent>_<label>``, the label always 9 ASCII characters (``p20260105`` for the
range starting that day, ``l`` and 8 hex digits of a list value's digest, ``p_default``), so the label of
any partition is the tail of its name however the parent's part was cut to fit 63 bytes. A partition's
indexes are named the same way after the partitioned index they belong to.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg import sql

from matview import timestamps
from matview.api import sqltext
from matview.api.spec import MaterializedView, PartitionBy, PartitioningSpec, PartitionPeriod, truncate_utf8
from matview.constants import MAX_IDENTIFIER_BYTES
from matview.plan import capture
from matview.plan.capture import EVERY_ROW, claim_for_partitions, swap_committed
from matview.plan.marker import Marker
from matview.plan.statements import (
    FromRows,
    Statement,
    Step,
    StepItem,
    comment_sql,
    create_index_sql,
    relation_id,
    retired_index_name,
    retired_name,
    staging_index_name,
    staging_name,
)

#: At most this many partitions come from the data (the newest ranges, the first list values); rows of any
#: other go to the DEFAULT partition. PostgreSQL plans slower with thousands of partitions, and the data
#: (untrusted) must not decide how many tables the engine creates.
MAX_PARTITIONS = 1000
#: A list value longer than this gets no partition of its own (its rows go to DEFAULT): values enter the DDL
#: as literals, and a few megabyte-long values must not make megabyte-long statements.
MAX_LIST_VALUE_BYTES = 1024
LABEL_LENGTH = 9
DEFAULT_LABEL = "p_default"
#: Range bounds must be dates Python and every DateStyle agree on: data beyond these (infinity, BC, year
#: 9999) goes to DEFAULT.
EARLIEST = datetime.date(1, 1, 1)
LATEST = datetime.date(9990, 1, 1)
FLAT_SUFFIX = "_mv_flat"

UTC = sql.SQL("SET LOCAL TimeZone = 'UTC'")
_KEYWORDS = {PartitionBy.RANGE: sql.SQL("RANGE"), PartitionBy.LIST: sql.SQL("LIST")}

_RANGE_BUCKETS = sql.SQL("""
SELECT CAST(pg_catalog.date_trunc(%(unit)s, LOCALTIMESTAMP) AS pg_catalog.date),
       ARRAY(SELECT CAST(b AS pg_catalog.date) FROM (
               SELECT DISTINCT pg_catalog.date_trunc(%(unit)s, CAST({column} AS pg_catalog.timestamp)) AS b FROM {flat}
             ) AS buckets
             WHERE b OPERATOR(pg_catalog.>=) CAST(%(earliest)s AS pg_catalog.timestamp)
               AND b OPERATOR(pg_catalog.<) CAST(%(latest)s AS pg_catalog.timestamp)
             ORDER BY b DESC LIMIT %(cap)s)""")
_LIST_VALUES = sql.SQL("""
SELECT ARRAY(SELECT v FROM (SELECT DISTINCT CAST({column} AS pg_catalog.text) AS v FROM {flat}) AS list_values
             WHERE v IS NULL OR pg_catalog.octet_length(v) OPERATOR(pg_catalog.<=) %(longest)s
             ORDER BY v COLLATE pg_catalog."C" NULLS FIRST LIMIT %(cap)s)""")
#: Each partition of the named parents, with each of its indexes and the partitioned index it belongs to.
_PARTITIONS_OF = sql.SQL("""
SELECT parent.relname::pg_catalog.text, child.relname::pg_catalog.text,
       parent_index.relname::pg_catalog.text, child_index.relname::pg_catalog.text
FROM pg_catalog.pg_inherits i
JOIN pg_catalog.pg_class parent ON parent.oid OPERATOR(pg_catalog.=) i.inhparent
JOIN pg_catalog.pg_class child ON child.oid OPERATOR(pg_catalog.=) i.inhrelid
JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) parent.relnamespace
LEFT JOIN pg_catalog.pg_index x ON x.indrelid OPERATOR(pg_catalog.=) child.oid
LEFT JOIN pg_catalog.pg_class child_index ON child_index.oid OPERATOR(pg_catalog.=) x.indexrelid
LEFT JOIN pg_catalog.pg_inherits ii ON ii.inhrelid OPERATOR(pg_catalog.=) x.indexrelid
LEFT JOIN pg_catalog.pg_class parent_index ON parent_index.oid OPERATOR(pg_catalog.=) ii.inhparent
WHERE n.nspname OPERATOR(pg_catalog.=) %(schema)s AND parent.relname OPERATOR(pg_catalog.=) ANY(%(parents)s)
ORDER BY 1, 2, 3""")


def partition_name(parent: str, label: str) -> str:
    """``<parent>_<label>``, the parent's part cut (never the label) to fit PostgreSQL's 63 bytes. A cut
    parent ends in 6 hex digits of its full name's digest: a view, its staging and its retired copy share a
    long prefix, and their partitions must not share names."""
    budget = MAX_IDENTIFIER_BYTES - LABEL_LENGTH - 1
    if len(parent.encode()) > budget:
        parent = truncate_utf8(parent, budget - 7) + "_" + hashlib.sha256(parent.encode()).hexdigest()[:6]
    return parent + "_" + label


def flat_name(view: MaterializedView) -> str:
    """The unlogged table a partitioned build puts the query's rows in first (dropped before it commits)."""
    return truncate_utf8(view.name, MAX_IDENTIFIER_BYTES - len(FLAT_SUFFIX)) + FLAT_SUFFIX


def bound_literal(day: datetime.date) -> str:
    """A range bound as text every column type of a range reads alike: a date takes the day, a timestamp its
    midnight, a timestamptz UTC's midnight, whatever the session's TimeZone."""
    return f"{day.isoformat()} 00:00:00+00"


def _range_bounds(lower: datetime.date, period: PartitionPeriod) -> sql.Composed:
    """``FOR VALUES FROM (…) TO (…)`` of the range partition starting at lower."""
    return sql.SQL("FOR VALUES FROM ({}) TO ({})").format(
        sql.Literal(bound_literal(lower)), sql.Literal(bound_literal(next_period(lower, period)))
    )


def _range_partition_sql(schema: str, parent: str, lower: datetime.date, period: PartitionPeriod) -> sql.Composed:
    """Make the range partition of ``parent`` starting at lower, named after it."""
    return sql.SQL("CREATE TABLE {} PARTITION OF {} {}").format(
        relation_id(schema, partition_name(parent, range_label(lower))),
        relation_id(schema, parent),
        _range_bounds(lower, period),
    )


def _lock_view(parent: sql.Identifier) -> sql.Composed:
    """The view alone, not its partitions: readers lock it before its partitions, so whoever changes which
    partitions it has takes it first."""
    return sql.SQL("LOCK TABLE ONLY {} IN ACCESS EXCLUSIVE MODE").format(parent)


def _label_of(parent: str, child: str) -> str | None:
    """The label of child when it is a partition of parent as this engine names them (None: another name)."""
    label = child[-LABEL_LENGTH:]
    return label if child == partition_name(parent, label) else None


def range_label(lower: datetime.date) -> str:
    return "p" + lower.strftime("%Y%m%d")


def list_label(value: str | None) -> str:
    encoded = b"\x00null" if value is None else value.encode()
    return "l" + hashlib.sha256(encoded).hexdigest()[:8]


def next_period(lower: datetime.date, period: PartitionPeriod) -> datetime.date:
    if period is PartitionPeriod.DAY:
        return lower + datetime.timedelta(days=1)
    if period is PartitionPeriod.WEEK:
        return lower + datetime.timedelta(days=7)
    return (lower.replace(day=1) + datetime.timedelta(days=32)).replace(day=1)


def build_statements(view: MaterializedView, target_name: str, query: sql.Composable) -> list[StepItem]:
    """Build the partitioned table ``target_name`` from ``query`` (the view's query, embedded by the caller
    through the one door): rows into a flat unlogged table, the partitioned table of its shape with a DEFAULT
    partition and the partitions its rows need, the rows routed in, the flat table dropped."""
    spec = view.partitioning
    assert spec is not None
    flat = relation_id(view.schema, flat_name(view))
    target = relation_id(view.schema, target_name)
    column = sql.Identifier(spec.column)
    return [
        # UNLOGGED: these rows live for one transaction, never on a standby; only the routed copy is logged.
        sql.SQL("CREATE UNLOGGED TABLE {} AS {} WITH DATA").format(flat, query),
        # The query has run in the session's time zone; periods of a timestamptz are UTC's, whoever builds.
        UTC,
        sql.SQL("CREATE TABLE {} (LIKE {}) PARTITION BY {} ({})").format(target, flat, _KEYWORDS[spec.by], column),
        sql.SQL("CREATE TABLE {} PARTITION OF {} DEFAULT").format(
            relation_id(view.schema, partition_name(target_name, DEFAULT_LABEL)), target
        ),
        partitions_from_data(view, target_name),
        sql.SQL("INSERT INTO {} SELECT * FROM {}").format(target, flat),
        sql.SQL("DROP TABLE {}").format(flat),
    ]


def partitions_from_data(view: MaterializedView, target_name: str) -> FromRows:
    """The partitions the flat table's rows need, made as partitions of ``target_name``."""
    spec = view.partitioning
    assert spec is not None
    flat = relation_id(view.schema, flat_name(view))
    column = sql.Identifier(spec.column)
    if spec.by is PartitionBy.RANGE:
        assert spec.period is not None
        query = _RANGE_BUCKETS.format(column=column, flat=flat)
        parameters: dict[str, Any] = {
            "unit": spec.period.unit,
            "earliest": EARLIEST.isoformat(),
            "latest": LATEST.isoformat(),
            "cap": MAX_PARTITIONS,
        }
        summary = f"one partition per {spec.period.unit} of {spec.column} in the data, {spec.ahead} ahead"
    else:
        query = _LIST_VALUES.format(column=column, flat=flat)
        parameters = {"longest": MAX_LIST_VALUE_BYTES, "cap": MAX_PARTITIONS}
        summary = f"one partition per value of {spec.column} in the data"

    def then(rows: list[tuple[Any, ...]]) -> list[Statement]:
        return partition_statements(view, target_name, rows[0] if rows else ())

    return FromRows(summary, (query, parameters), then)


def partition_statements(view: MaterializedView, target_name: str, row: Sequence[Any]) -> list[Statement]:
    """CREATE TABLE … PARTITION OF for the bucket query's row: (current period, [range starts]) for a range,
    ([values as text]) for a list."""
    spec = view.partitioning
    assert spec is not None
    target = relation_id(view.schema, target_name)
    if spec.by is PartitionBy.LIST:
        values: list[str | None] = list(row[0]) if row else []
        return [
            sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES IN ({})").format(
                relation_id(view.schema, partition_name(target_name, list_label(value))), target, sql.Literal(value)
            )
            for value in values
        ]
    assert spec.period is not None
    current, starts = (row[0], list(row[1])) if row else (None, [])
    return [
        _range_partition_sql(view.schema, target_name, lower, spec.period)
        for lower in range_starts(spec, starts, current)
    ]


def range_starts(
    spec: PartitioningSpec, starts: Sequence[datetime.date], current: datetime.date | None
) -> list[datetime.date]:
    """The data's range starts and the current period's, then ``ahead`` more after the newest of them (the
    current period and those ahead are where new rows will go)."""
    assert spec.period is not None
    chosen = sorted({*starts, *([current] if current is not None and EARLIEST <= current < LATEST else [])})
    newest = max([*chosen, *([current] if current is not None else [])], default=None)
    if newest is not None and EARLIEST <= newest < LATEST:
        lower = newest
        for _ in range(spec.ahead):
            lower = next_period(lower, spec.period)
            if lower >= LATEST:
                break
            if lower not in chosen:
                chosen.append(lower)
    return sorted(chosen)


Renaming = tuple[dict[str, str], dict[str, str]]
"""Parents' new names: ({table: new table name}, {partitioned index: its new name})."""


def renames(view: MaterializedView, summary: str, steps: Sequence[Renaming], only: str | None = None) -> FromRows:
    """Name partitions and their indexes after their parents' (new) names: ``<table>_<label>`` and
    ``<index>_<label>``. ``steps`` run in order, each freeing the names the next takes (the old copy's
    partitions go to the retired names before the new copy's take the view's). ``only``: that label's."""
    parents = sorted({old for tables, _ in steps for old in tables})

    def then(rows: list[tuple[Any, ...]]) -> list[Statement]:
        statements: list[Statement] = []
        rows = [row for row in rows if only is None or str(row[1])[-LABEL_LENGTH:] == only]
        # Tables before their indexes, as autovacuum takes them: holding an index while waiting for its table
        # (which autovacuum holds while it waits for the index) would deadlock.
        for tables, indexes in steps:
            for parent, child in sorted({(row[0], row[1]) for row in rows}):
                label = _label_of(parent, child)
                if parent in tables and label is not None and tables[parent] != parent:
                    statements.append(
                        sql.SQL("ALTER TABLE {} RENAME TO {}").format(
                            relation_id(view.schema, child), sql.Identifier(partition_name(tables[parent], label))
                        )
                    )
            for parent, child, parent_index, child_index in rows:
                label = _label_of(parent, child)
                if parent not in tables or label is None:
                    continue  # not a partition this engine named: left as it is
                if child_index is not None and parent_index in indexes:
                    wanted = partition_name(indexes[parent_index], label)
                    if wanted != child_index:
                        statements.append(
                            sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                                relation_id(view.schema, child_index), sql.Identifier(wanted)
                            )
                        )
        return statements

    return FromRows(summary, (_PARTITIONS_OF, {"schema": view.schema, "parents": parents}), then)


# --- Rebuilding a partition at a time -------------------------------------------------------------------------
#
# A refresh that rebuilds a range-partitioned view in full never builds the whole view beside itself: each
# partition's rows are built apart (the query filtered on the partition's range, which PostgreSQL pushes into
# the query where it can), indexed, and given a CHECK constraint that proves the range; then one short
# transaction detaches the old partition and attaches the new one (the constraint spares ATTACH its scan), and
# the old one is dropped. Each partition commits on its own: peak extra disk is one partition, and readers of
# the view wait only for the attach. A rebuilt partition's marker records when its rebuild began: one that is
# newer than the view's last successful refresh was rebuilt by a rebuild that did not finish, and the next
# one resumes after it.


#: What a rebuild of a partitioned view took (the metric's ``scope`` label): every partition, or only those
#: its changed keys touch.
REBUILT_ALL = "all"
REBUILT_TOUCHED = "touched"
#: At most this many partition names in a status message.
SUMMARY_NAMES = 8


@dataclass
class PartitionWork:
    """What a refresh did to a partitioned view's partitions, filled in as its steps are planned and run (the
    result, the status message and the metrics report it)."""

    rebuilt: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    """Partitions a rebuild that did not finish had rebuilt already: not rebuilt again."""
    made: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)
    scope: str = REBUILT_ALL
    """Which partitions a rebuild took: REBUILT_ALL, or REBUILT_TOUCHED (those the changed keys touch)."""
    untouched: int = 0
    """A rebuild of the touched partitions: how many it left as they were."""

    @property
    def summary(self) -> str:
        """ "" when nothing was done to a partition."""
        parts = []
        if self.scope == REBUILT_TOUCHED:
            named = ", ".join(self.rebuilt[:SUMMARY_NAMES]) + (", …" if len(self.rebuilt) > SUMMARY_NAMES else "")
            parts.append(
                f"rebuilt only the {len(self.rebuilt)} partition(s) the changed keys touch"
                + (f" ({named})" if self.rebuilt else "")
                + f", {self.untouched} left as they were"
            )
        elif self.rebuilt:
            parts.append(f"rebuilt {len(self.rebuilt)} partition(s) one at a time")
        if self.resumed:
            parts.append(f"{len(self.resumed)} more rebuilt already by a rebuild that stopped")
        if self.made:
            parts.append("made " + ", ".join(self.made))
        if self.retired:
            parts.append("retired " + ", ".join(self.retired))
        return "; ".join(parts)

    def clear(self) -> None:
        for done in (self.rebuilt, self.resumed, self.made, self.retired):
            done.clear()
        self.scope, self.untouched = REBUILT_ALL, 0

    def as_dict(self) -> dict[str, object]:
        return {
            "rebuilt": len(self.rebuilt),
            "resumed": len(self.resumed),
            "made": self.made,
            "retired": self.retired,
            **({"scope": self.scope, "rebuiltNames": self.rebuilt} if self.scope == REBUILT_TOUCHED else {}),
        }


@dataclass(frozen=True)
class RebuildProgress:
    """How far a rebuild a partition at a time has got, told as each partition is swapped in (a long rebuild
    is hours of partitions: the status says where it is)."""

    started_at: datetime.datetime
    rebuilt: int
    """Partitions swapped in so far by this refresh."""
    to_rebuild: int
    """Partitions this refresh rebuilds (those a stopped rebuild had done already not counted)."""
    last: str
    """The partition swapped in last."""


@dataclass(frozen=True)
class PartitionFound:
    """A partition of the view, as the refresh read it: its name, and when a rebuild of this definition
    made it (None when unknown, or made by someone else or for another definition)."""

    name: str
    built: datetime.datetime | None = None


def rebuilds_by_partition(view: MaterializedView) -> bool:
    """Whether a full refresh of view rebuilds a partition at a time: a range-partitioned view with declared
    partition sources (without them each partition's build would run the whole query again, however little
    of it PostgreSQL can push the period into)."""
    return (
        view.partitioning is not None and view.partitioning.by is PartitionBy.RANGE and bool(view.partitioning.sources)
    )


def partition_marker(view: MaterializedView, built: datetime.datetime) -> Marker:
    """To the microsecond: compared with the last success, which is to the second (see ``rebuild_steps``)."""
    return Marker(
        view.owner, "partition", view.definition_digest, {"built": built.astimezone(datetime.UTC).isoformat()}
    )


def built_at(view: MaterializedView, marker: Marker | None) -> datetime.datetime | None:
    """When a rebuild of the view's current definition made the partition with this marker (None: unknown)."""
    if marker is None or marker.kind != "partition" or marker.owner != view.owner:
        return None
    if marker.digest != view.definition_digest:
        return None
    return timestamps.parse(marker.state.get("built"))


def range_start(label: str) -> datetime.date | None:
    """The first day of a range partition's label (None: not a range label)."""
    if len(label) != LABEL_LENGTH or not label.startswith("p") or not label[1:].isdigit():
        return None
    try:
        return datetime.datetime.strptime(label[1:], "%Y%m%d").date()
    except ValueError:
        return None


def _current_period(now: datetime.datetime, period: PartitionPeriod) -> datetime.date:
    """The first day of the period now is in, in UTC (as the partitions' bounds are)."""
    return period_of(now.astimezone(datetime.UTC).date(), period)


def period_of(day: datetime.date, period: PartitionPeriod) -> datetime.date:
    """The first day of the period holding day (weeks start on Monday, as date_trunc's)."""
    if period is PartitionPeriod.DAY:
        return day
    if period is PartitionPeriod.WEEK:
        return day - datetime.timedelta(days=day.weekday())
    return day.replace(day=1)


def rebuild_leftover_names(
    view: MaterializedView, found: Sequence[PartitionFound], now: datetime.datetime
) -> list[str]:
    """The names a per-partition rebuild builds beside the view or retires to: what a crash may have left."""
    labels = [DEFAULT_LABEL, *(range_label(day) for day in _ranges(view, found, now))]
    return sorted(
        {partition_name(parent, label) for label in labels for parent in (staging_name(view), retired_name(view))}
    )


def _ranges(view: MaterializedView, found: Sequence[PartitionFound], now: datetime.datetime) -> list[datetime.date]:
    """Every range the view has, and the ones it should have by now: up to ``ahead`` periods past the current
    one, from the newest it has (at most MAX_PARTITIONS)."""
    spec = view.partitioning
    assert spec is not None and spec.period is not None
    have = sorted({day for f in found if (day := range_start(f.name[-LABEL_LENGTH:])) is not None})
    current = _current_period(now, spec.period)
    wanted = list(have)
    if have and current < LATEST:
        day = next_period(have[-1], spec.period)
        last = periods_to_come(view, now)[-1]
        while day <= last and len(wanted) < MAX_PARTITIONS:
            wanted.append(day)
            day = next_period(day, spec.period)
    return wanted


def rebuild_steps(
    view: MaterializedView,
    found: Sequence[PartitionFound],
    since: datetime.datetime | None,
    now: datetime.datetime,
    catalog: sqltext.KeyCatalog,
    work: PartitionWork | None = None,
) -> list[Step]:
    """Rebuild the view a partition at a time: the DEFAULT partition first (its rows are the query's rows in no
    range, including the ranges about to be made), then the partitions the current period and ``ahead`` call
    for, made empty, then every range newest first. A partition rebuilt after ``since`` (the last success) by
    a rebuild that did not finish is not rebuilt again."""
    spec = view.partitioning
    assert spec is not None and spec.period is not None
    cutoff = retention_cutoff(view, now)
    ranges = [day for day in _ranges(view, found, now) if cutoff is None or next_period(day, spec.period) > cutoff]
    existing = {label: f for f in found if (label := _label_of(view.name, f.name)) is not None}
    new = [day for day in ranges if range_label(day) not in existing]

    def fresh(label: str) -> bool:
        # The last success is written to the second, cut down: a rebuild that began within a second of it may
        # have been that success itself, and is redone.
        built = existing[label].built if label in existing else None
        return since is not None and built is not None and built >= since + datetime.timedelta(seconds=1)

    work = work if work is not None else PartitionWork()
    steps: list[Step] = []
    if view.incremental is not None:
        # Every partition is built after this commits, so each includes the changes it forgets.
        steps.append(Step(f"claim the changes of {view.relation} for its rebuild", tuple(claim_for_partitions(view))))
    (work.resumed if fresh(DEFAULT_LABEL) else work.rebuilt).append(partition_name(view.name, DEFAULT_LABEL))
    if not fresh(DEFAULT_LABEL):
        steps += _default_rebuild_steps(view, ranges, cutoff, now, DEFAULT_LABEL in existing)
    if new:
        steps.append(
            Step(
                f"make {len(new)} partition(s) of {view.relation} for the periods to come",
                tuple(_range_partition_sql(view.schema, view.name, day, spec.period) for day in new),
                takes_exclusive_lock=True,
            )
        )
    for day in sorted(ranges, reverse=True):
        label = range_label(day)
        if label in existing and fresh(label):
            work.resumed.append(partition_name(view.name, label))
            continue
        work.rebuilt.append(partition_name(view.name, label))
        steps += _range_rebuild_steps(view, day, now, catalog)
    if view.incremental is not None:
        steps.append(Step(f"the rebuild of {view.relation} is complete", (swap_committed(view),)))
    return steps


def _default_rebuild_steps(
    view: MaterializedView,
    ranges: Sequence[datetime.date],
    cutoff: datetime.date | None,
    now: datetime.datetime,
    exists: bool,
) -> list[Step]:
    """Rebuild the DEFAULT partition: the rows in none of the ``ranges`` (and inside the retention window).
    They are the rows in no period, whatever the sources hold: filtering a source to "no period" could make
    rows of its own (the other side of an outer join, once the source's rows are gone): the whole query, once."""
    outside = sql.SQL("({}) AND {}").format(_outside(view, _spans(view, ranges)), kept(view, cutoff))
    return _partition_steps(view, DEFAULT_LABEL, view.query, outside, None, now, exists)


def _range_rebuild_steps(
    view: MaterializedView,
    day: datetime.date,
    now: datetime.datetime,
    catalog: sqltext.KeyCatalog,
) -> list[Step]:
    """Rebuild the existing range partition starting at day: build it apart, swap it in, drop the old one."""
    assert view.partitioning is not None and view.partitioning.period is not None
    upper = next_period(day, view.partitioning.period)
    if view.incremental is not None:
        # The keys with a source row in the period, and the query filtered on them as an incremental refresh
        # filters it: every row of those keys, whatever else of theirs lies in other periods, then the
        # period's. (Slicing each read of the source instead would hide a key's rows of other periods from
        # what the query computes over all of them.)
        query = capture.key_filtered_query(view, catalog).query
        prelude = _period_keys(view, (day, upper))
    else:
        query, prelude = _sliced_query(view, catalog, (day, upper)), []
    return _partition_steps(
        view, range_label(day), query, _within(view, [(day, upper)]), (day, upper), now, True, prelude
    )


# --- Rebuilding only the partitions the changes touch ---------------------------------------------------------
#
# When Auto rebuilds an incremental view because its changed keys are too many to apply one by one, the log
# still says which keys changed, and the declared partition sources say where a key's rows go: a key's rows
# lie in the periods of its partition sources' rows. So only the partitions that held a changed key's rows
# (the view's own rows say which) or will hold them (its sources' rows say which) are rebuilt; every other
# partition holds no row of a changed key and stays as it is. The keys are claimed and their periods read in
# one transaction (one snapshot: a change committed after it stays in the log for the next refresh), which
# leaves SWAP_PENDING in the log as a full rebuild's claim does: a rebuild that stops midway is resumed as a
# whole one. A changed key with a row in no range partition (the DEFAULT partition's rows, or a period
# without a partition) makes it a whole rebuild: the DEFAULT partition is built from the whole query.

_TOUCHED = sql.SQL("""
SELECT DISTINCT CASE WHEN inside THEN CAST(b AS pg_catalog.date) END, inside
FROM (SELECT b, (b OPERATOR(pg_catalog.>=) CAST(%(earliest)s AS pg_catalog.timestamp)
                 AND b OPERATOR(pg_catalog.<) CAST(%(latest)s AS pg_catalog.timestamp)) IS TRUE AS inside
      FROM ({periods}) AS touched (b)) AS bounded""")
_PERIOD_OF_ROWS = sql.SQL(
    "SELECT pg_catalog.date_trunc(%(unit)s, CAST({column} AS pg_catalog.timestamp)) FROM {table} AS {alias} "
    "WHERE ({keys}) {claimed}"
)


@dataclass
class TouchedPeriods:
    """What the claim of a rebuild of the touched partitions read: each period a claimed key's rows were or
    will be in (None: a row in no period the engine can name, which only the DEFAULT partition holds)."""

    periods: list[datetime.date | None] | None = None
    """None until the claim has run."""


def claim_touched_step(view: MaterializedView, touched: TouchedPeriods) -> Step:
    """Claim the changed keys (out of the log, SWAP_PENDING in) and read the periods their rows are in, the
    view's (where they were) and the partition sources' (where they will be), into ``touched``. Run as the
    view's builder: it reads the sources as the query would."""
    spec, incremental = view.partitioning, view.incremental
    assert spec is not None and spec.period is not None and incremental is not None
    keys = incremental.key_columns
    columns = {source.relation: source.columns for source in incremental.sources}
    claimed = capture.in_claimed_keys(view)
    reads = [
        _PERIOD_OF_ROWS.format(
            column=sql.Identifier("s", source.column),
            table=relation_id(*source.relation),
            alias=sql.Identifier("s"),
            keys=sql.SQL(", ").join(sql.Identifier("s", c) for c in columns[source.relation]),
            claimed=claimed,
        )
        for source in spec.sources
    ]
    reads.append(
        _PERIOD_OF_ROWS.format(
            column=sql.Identifier("v", spec.column),
            table=relation_id(view.schema, view.name),
            alias=sql.Identifier("v"),
            keys=capture.key_list(keys, "v"),
            claimed=claimed,
        )
    )
    parameters = {"unit": spec.period.unit, "earliest": EARLIEST.isoformat(), "latest": LATEST.isoformat()}

    def then(rows: list[tuple[Any, ...]]) -> list[Statement]:
        touched.periods = [day if inside else None for day, inside in rows]
        return []

    return Step(
        f"claim the changes of {view.relation} and find the partitions they touch",
        (
            UTC,  # periods of a timestamptz are UTC's, as the partitions' bounds are
            *capture.claim_keys_statements(view),
            capture.request_full_rebuild(view, capture.SWAP_PENDING),
            FromRows(
                "the periods of the changed keys' rows",
                (_TOUCHED.format(periods=sql.SQL(" UNION ALL ").join(reads)), parameters),
                then,
            ),
        ),
        runs_query=True,
        repeatable_read=True,
    )


def touched_ranges(
    view: MaterializedView,
    found: Sequence[PartitionFound],
    periods: Sequence[datetime.date | None],
    now: datetime.datetime,
) -> tuple[list[datetime.date], bool]:
    """The range partitions to rebuild for the touched periods (those retention keeps), and whether the DEFAULT
    partition is touched too (a row with no period, or in a period without a partition)."""
    spec = view.partitioning
    assert spec is not None and spec.period is not None
    cutoff = retention_cutoff(view, now)
    existing = {label for f in found if (label := _label_of(view.name, f.name)) is not None}
    days: set[datetime.date] = set()
    default = False
    for day in periods:
        if day is not None and cutoff is not None and next_period(day, spec.period) <= cutoff:
            continue  # retired: none of its rows is stored again
        if day is None or range_label(day) not in existing:
            default = True  # its rows are the DEFAULT partition's
        else:
            days.add(day)
    return sorted(days), default


def touched_rebuild_steps(
    view: MaterializedView,
    found: Sequence[PartitionFound],
    touched: tuple[Sequence[datetime.date], bool],
    now: datetime.datetime,
    catalog: sqltext.KeyCatalog,
    work: PartitionWork | None = None,
) -> list[Step]:
    """Rebuild what ``touched_ranges`` found (after ``claim_touched_step``): the DEFAULT partition when touched
    (from the whole query, as a full rebuild does), then the range partitions, newest first."""
    spec = view.partitioning
    assert spec is not None and spec.period is not None
    days, default = touched
    work = work if work is not None else PartitionWork()
    work.scope = REBUILT_TOUCHED
    labels = [label for f in found if (label := _label_of(view.name, f.name)) is not None]
    steps: list[Step] = []
    if default:
        cutoff = retention_cutoff(view, now)
        # The DEFAULT partition holds what no existing range partition does: its rows exclude those ranges only
        # (a period to come without its partition yet keeps its rows there until maintenance can make it).
        ranges = [
            day
            for label in labels
            if (day := range_start(label)) is not None and (cutoff is None or next_period(day, spec.period) > cutoff)
        ]
        work.rebuilt.append(partition_name(view.name, DEFAULT_LABEL))
        steps += _default_rebuild_steps(view, ranges, cutoff, now, DEFAULT_LABEL in labels)
    for day in sorted(days, reverse=True):
        work.rebuilt.append(partition_name(view.name, range_label(day)))
        steps += _range_rebuild_steps(view, day, now, catalog)
    work.untouched = len(labels) - len(work.rebuilt)
    steps.append(Step(f"the rebuild of {view.relation}'s touched partitions is complete", (swap_committed(view),)))
    return steps


def _within(view: MaterializedView, spans: Sequence[tuple[datetime.date, datetime.date]]) -> sql.Composable:
    assert view.partitioning is not None
    return _within_column(sql.Identifier(view.partitioning.column), spans)


def _within_column(column: sql.Identifier, spans: Sequence[tuple[datetime.date, datetime.date]]) -> sql.Composable:
    return sql.SQL(" OR ").join(
        sql.SQL("({col} OPERATOR(pg_catalog.>=) {lo} AND {col} OPERATOR(pg_catalog.<) {hi})").format(
            col=column, lo=sql.Literal(bound_literal(lo)), hi=sql.Literal(bound_literal(hi))
        )
        for lo, hi in spans
    )


def _spans(view: MaterializedView, ranges: Sequence[datetime.date]) -> list[tuple[datetime.date, datetime.date]]:
    """The ranges as [lower, upper) spans, contiguous ones merged."""
    spec = view.partitioning
    assert spec is not None and spec.period is not None
    spans: list[tuple[datetime.date, datetime.date]] = []
    for day in sorted(ranges):
        upper = next_period(day, spec.period)
        if spans and spans[-1][1] == day:
            spans[-1] = (spans[-1][0], upper)
        else:
            spans.append((day, upper))
    return spans


def _sliced_query(
    view: MaterializedView,
    catalog: sqltext.KeyCatalog,
    period: tuple[datetime.date, datetime.date],
) -> sqltext.CheckedSQL:
    """The query reading only one period of each partition source: the partition's slice, not the whole."""
    assert view.partitioning is not None
    columns = {source.relation: source.column for source in view.partitioning.sources}
    return sqltext.period_slices(view.query, catalog, columns).query(bound_literal(period[0]), bound_literal(period[1]))


def _period_keys(view: MaterializedView, period: tuple[datetime.date, datetime.date]) -> list[Statement]:
    """The temporary table of keys a key-filtered query reads, filled with the keys of the partition sources'
    rows in the period (each is an incremental source too: its columns that give the key are declared)."""
    assert view.incremental is not None and view.partitioning is not None
    keys = view.incremental.key_columns
    columns = {source.relation: source.columns for source in view.incremental.sources}
    selects = [
        sql.SQL("SELECT {} FROM {} AS s WHERE {}").format(
            sql.SQL(", ").join(
                sql.SQL("{} AS {}").format(sql.Identifier("s", c), sql.Identifier(k))
                for c, k in zip(columns[source.relation], keys, strict=True)
            ),
            relation_id(*source.relation),
            _within_column(sql.Identifier("s", source.column), [period]),
        )
        for source in view.partitioning.sources
    ]
    temporary = sql.Identifier(*sqltext.CHANGED_KEYS_TABLE)
    return [
        sql.SQL("CREATE TEMPORARY TABLE {} ON COMMIT DROP AS SELECT DISTINCT * FROM ({}) AS k").format(
            sql.Identifier(sqltext.CHANGED_KEYS_TABLE[1]), sql.SQL(" UNION ALL ").join(selects)
        ),
        sql.SQL("CREATE UNIQUE INDEX ON {} ({})").format(temporary, capture.key_list(keys)),
        sql.SQL("ANALYZE {}").format(temporary),
    ]


def _outside(view: MaterializedView, spans: Sequence[tuple[datetime.date, datetime.date]]) -> sql.Composable:
    """The DEFAULT partition's rows: no value, or a value in none of the spans."""
    spec = view.partitioning
    assert spec is not None
    if not spans:
        return EVERY_ROW
    return sql.SQL("{} IS NULL OR NOT ({})").format(sql.Identifier(spec.column), _within(view, spans))


def _partition_steps(
    view: MaterializedView,
    label: str,
    query: sqltext.CheckedSQL,
    rows: sql.Composable,
    bounds: tuple[datetime.date, datetime.date] | None,
    now: datetime.datetime,
    exists: bool,
    prelude: Sequence[Statement] = (),
) -> list[Step]:
    """Build one partition's rows apart, then swap it in for the old one (if there is one), then drop the
    old one."""
    assert view.partitioning is not None
    column, period = view.partitioning.column, view.partitioning.period
    schema, parent = view.schema, relation_id(view.schema, view.name)
    stage_name = partition_name(staging_name(view), label)
    final_name = partition_name(view.name, label)
    retired = partition_name(retired_name(view), label)
    stage, final = relation_id(schema, stage_name), relation_id(schema, final_name)
    check = sql.Identifier("matview_partition_bound")
    build: list[StepItem] = [
        *prelude,
        sql.SQL("CREATE TABLE {} AS SELECT * FROM ({}) AS q WHERE {} WITH DATA").format(
            stage, sqltext.embed(query), rows
        ),
    ]
    if bounds is not None:  # proves the range to ATTACH, which then skips its scan under the lock
        build.append(
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({} IS NOT NULL AND ({}))").format(
                stage, check, sql.Identifier(column), rows
            )
        )
    index_renames: list[Statement] = []
    for index in view.indexes:
        final_index = view.index_name(index)
        staged = partition_name(staging_index_name(final_index), label)
        build.append(create_index_sql(view, index, staged, stage, concurrently=False))
        index_renames.append(
            sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                relation_id(schema, staged), sql.Identifier(partition_name(final_index, label))
            )
        )
    build.append(comment_sql("view", stage, Marker(view.owner, "staging", "partition"), "r"))
    build.append(sql.SQL("ANALYZE {}").format(stage))
    attach = (
        sql.SQL("ALTER TABLE {} ATTACH PARTITION {} {}").format(parent, stage, _range_bounds(bounds[0], period))
        if bounds is not None and period is not None
        else sql.SQL("ALTER TABLE {} ATTACH PARTITION {} DEFAULT").format(parent, stage)
    )
    retired_indexes = {view.index_name(i): retired_index_name(view.index_name(i)) for i in view.indexes}
    # The parent first: a swap that took the partition first (its rename) would deadlock with readers.
    swap: list[StepItem] = [_lock_view(parent)]
    # Then the two partitions, before any of their indexes (see ``renames``).
    if exists:
        swap.append(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(final))
    swap.append(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(stage))
    if exists:
        swap += [
            renames(
                view,
                f"retire the partition {final_name} and its indexes",
                [({view.name: retired_name(view)}, retired_indexes)],
                only=label,
            ),
            sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(parent, relation_id(schema, retired)),
            comment_sql("view", relation_id(schema, retired), Marker(view.owner, "staging", "retired"), "r"),
        ]
    swap += [
        attach,
        sql.SQL("ALTER TABLE {} RENAME TO {}").format(stage, sql.Identifier(final_name)),
        *index_renames,
        comment_sql("view", final, partition_marker(view, now), "r"),
    ]
    if bounds is not None:
        swap.append(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(final, check))
    return [
        Step(
            f"build partition {final_name} of {view.relation} apart",
            tuple(build),
            runs_query=True,
            cleanup=(sql.SQL("DROP TABLE IF EXISTS {}").format(stage),),
        ),
        Step(
            f"swap the rebuilt partition {final_name} in",
            tuple(swap),
            takes_exclusive_lock=True,
            completes=final_name,
        ),
        Step(
            f"drop the retired partition {retired}",
            (sql.SQL("DROP TABLE IF EXISTS {}").format(relation_id(schema, retired)),),
        ),
    ]


# --- Retention ------------------------------------------------------------------------------------------------


def retention_cutoff(view: MaterializedView, now: datetime.datetime) -> datetime.date | None:
    """The first day kept: the current period's start, less the window, back to a period's start (None: the
    view keeps everything). A partition that ends on or before it is retired; a row before it is never
    stored again."""
    spec = view.partitioning
    if spec is None or spec.retain is None or spec.period is None:
        return None
    current = _current_period(now, spec.period)
    count, unit = spec.retain.count, spec.retain.unit
    if unit == "d":
        back = current - datetime.timedelta(days=count)
    elif unit == "w":
        back = current - datetime.timedelta(weeks=count)
    else:
        months = current.year * 12 + current.month - 1 - count
        back = datetime.date(months // 12, months % 12 + 1, 1) if months >= 12 else EARLIEST
    return max(period_of(back, spec.period), EARLIEST)


def kept(view: MaterializedView, cutoff: datetime.date | None, alias: str | None = None) -> sql.Composable:
    """The rows retention keeps: no value, or a value on or after the cutoff (``true`` without retention)."""
    if cutoff is None or view.partitioning is None:
        return EVERY_ROW
    column = sql.Identifier(alias, view.partitioning.column) if alias else sql.Identifier(view.partitioning.column)
    return sql.SQL("({col} IS NULL OR {col} OPERATOR(pg_catalog.>=) {cutoff})").format(
        col=column, cutoff=sql.Literal(bound_literal(cutoff))
    )


#: A range view's partitions (the first query of a maintenance read).
_PARTITION_NAMES = sql.SQL("""
SELECT 'partition', child.relname::pg_catalog.text
FROM pg_catalog.pg_inherits i
JOIN pg_catalog.pg_class parent ON parent.oid OPERATOR(pg_catalog.=) i.inhparent
JOIN pg_catalog.pg_class child ON child.oid OPERATOR(pg_catalog.=) i.inhrelid
JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) parent.relnamespace
WHERE n.nspname OPERATOR(pg_catalog.=) %(schema)s AND parent.relname OPERATOR(pg_catalog.=) %(name)s""")
#: A period to come whose partition is missing and whose rows already sit in the DEFAULT partition (the
#: partition cannot be made over them: they stay there until the view is rebuilt).
_OCCUPIED = sql.SQL("""
UNION ALL SELECT 'occupied', {label} WHERE pg_catalog.to_regclass({qualified}) IS NULL AND EXISTS (
    SELECT 1 FROM {default} AS d WHERE d.{column} OPERATOR(pg_catalog.>=) {lower}
                                   AND d.{column} OPERATOR(pg_catalog.<) {upper})""")


def periods_to_come(view: MaterializedView, now: datetime.datetime) -> list[datetime.date]:
    """The current period and ``ahead`` more: where new rows go, so they must have partitions."""
    spec = view.partitioning
    assert spec is not None and spec.period is not None
    day = _current_period(now, spec.period)
    days = [day]
    for _ in range(spec.ahead):
        day = next_period(day, spec.period)
        if day >= LATEST:
            break
        days.append(day)
    return days


def maintenance_due(view: MaterializedView, now: datetime.datetime) -> tuple[object, ...] | None:
    """What decides what maintenance does besides the catalog: the definition, the periods to come and the
    retention cutoff (None for a view without maintenance). Once a maintenance found the catalog as these
    ask, the next has nothing to do until they change, unless someone changed the partitions by hand."""
    spec = view.partitioning
    if spec is None or spec.period is None or spec.by is not PartitionBy.RANGE:
        return None
    return (view.definition_digest, tuple(periods_to_come(view, now)), retention_cutoff(view, now))


def maintenance_step(view: MaterializedView, now: datetime.datetime, work: PartitionWork | None = None) -> Step | None:
    """After every refresh of a range-partitioned view (one with nothing to apply too): make the partitions of
    the current period and ``ahead`` more that are missing (an incremental view is not rebuilt, and a new week
    must not pile up in the DEFAULT partition), and detach and drop those that left the retention window. No
    row is rewritten; the view is locked (briefly: no scan but the DEFAULT partition's check for the new
    periods' rows, then unlinking files) only when there is something to do. None for other views."""
    spec = view.partitioning
    if spec is None or spec.period is None or spec.by is not PartitionBy.RANGE:
        return None
    period = spec.period
    cutoff = retention_cutoff(view, now)
    coming = [day for day in periods_to_come(view, now) if cutoff is None or next_period(day, period) > cutoff]
    parent = relation_id(view.schema, view.name)
    default = relation_id(view.schema, partition_name(view.name, DEFAULT_LABEL))
    column = sql.Identifier(spec.column)
    read: list[sql.Composable] = [_PARTITION_NAMES]
    for day in coming:
        name = partition_name(view.name, range_label(day))
        read.append(
            _OCCUPIED.format(
                label=sql.Literal(range_label(day)),
                qualified=sql.Literal(".".join(sqltext.quote_identifier(part) for part in (view.schema, name))),
                default=default,
                column=column,
                lower=sql.Literal(bound_literal(day)),
                upper=sql.Literal(bound_literal(next_period(day, period))),
            )
        )

    def then(rows: list[tuple[Any, ...]]) -> list[Statement]:
        have = {str(name) for kind, name in rows if kind == "partition"}
        occupied = {str(label) for kind, label in rows if kind == "occupied"}
        if partition_name(view.name, DEFAULT_LABEL) not in have:
            return []  # not a partitioned view of ours as the engine builds it: nothing to maintain
        statements: list[Statement] = []
        for day in coming:
            label = range_label(day)
            if partition_name(view.name, label) not in have and label not in occupied:
                if work is not None:
                    work.made.append(partition_name(view.name, label))
                statements.append(_range_partition_sql(view.schema, view.name, day, period))
        for child in sorted(have):
            ours = _label_of(view.name, child)
            start = range_start(ours) if ours is not None else None
            if cutoff is not None and start is not None and next_period(start, period) <= cutoff:
                child_id = relation_id(view.schema, child)
                if work is not None:
                    work.retired.append(child)
                statements.append(sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(parent, child_id))
                statements.append(sql.SQL("DROP TABLE {}").format(child_id))
        return [_lock_view(parent), *statements] if statements else []

    retention = f", retire those before {cutoff} (retain {spec.retain.text})" if cutoff and spec.retain else ""
    return Step(
        f"keep the partitions of {view.relation}: make the periods to come{retention}",
        (
            FromRows(
                f"partitions for {', '.join(str(day) for day in coming)}{retention}",
                (sql.Composed(read), {"schema": view.schema, "name": view.name}),
                then,
            ),
        ),
        takes_exclusive_lock=True,
    )
