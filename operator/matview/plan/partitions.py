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
from typing import Any

from psycopg import sql

from matview.api.spec import MaterializedView, PartitionBy, PartitioningSpec, PartitionPeriod, truncate_utf8
from matview.constants import MAX_IDENTIFIER_BYTES
from matview.plan.statements import FromRows, Statement, relation_id

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


def build_statements(view: MaterializedView, target_name: str, query: sql.Composable) -> list[Statement | FromRows]:
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
        sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
            relation_id(view.schema, partition_name(target_name, range_label(lower))),
            target,
            sql.Literal(bound_literal(lower)),
            sql.Literal(bound_literal(next_period(lower, spec.period))),
        )
        for lower in range_starts(spec, starts, current)
    ]


def range_starts(
    spec: PartitioningSpec, starts: Sequence[datetime.date], current: datetime.date | None
) -> list[datetime.date]:
    """The data's range starts, then ``ahead`` more after the later of its newest and the current period."""
    assert spec.period is not None
    chosen = sorted(set(starts))
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


def renames(view: MaterializedView, summary: str, steps: Sequence[Renaming]) -> FromRows:
    """Name partitions and their indexes after their parents' (new) names: ``<table>_<label>`` and
    ``<index>_<label>``. ``steps`` run in order, each freeing the names the next takes (the old copy's
    partitions go to the retired names before the new copy's take the view's)."""
    parents = sorted({old for tables, _ in steps for old in tables})

    def then(rows: list[tuple[Any, ...]]) -> list[Statement]:
        statements: list[Statement] = []
        for tables, indexes in steps:
            for parent, child, parent_index, child_index in rows:
                label = str(child)[-LABEL_LENGTH:]
                if parent not in tables or child != partition_name(parent, label):
                    continue  # not a partition this engine named: left as it is
                if child_index is not None and parent_index in indexes:
                    wanted = partition_name(indexes[parent_index], label)
                    if wanted != child_index:
                        statements.append(
                            sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                                relation_id(view.schema, child_index), sql.Identifier(wanted)
                            )
                        )
            for parent, child in sorted({(row[0], row[1]) for row in rows}):
                label = str(child)[-LABEL_LENGTH:]
                if parent in tables and child == partition_name(parent, label) and tables[parent] != parent:
                    statements.append(
                        sql.SQL("ALTER TABLE {} RENAME TO {}").format(
                            relation_id(view.schema, child), sql.Identifier(partition_name(tables[parent], label))
                        )
                    )
        return statements

    return FromRows(summary, (_PARTITIONS_OF, {"schema": view.schema, "parents": parents}), then)
