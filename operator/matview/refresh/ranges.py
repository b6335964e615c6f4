"""Read an incremental view's append-only sources by range into its change log, before a refresh decides.

A source declared ``appendOnly`` has no INSERT trigger: its writers pay nothing for their INSERTs (issue #23).
Its new rows are the rows above the watermark the last successful refresh recorded in the view's marker, up
to the column's largest value now. Taking that upper bound is only safe once no writer can still commit a row
below it: a row whose value was assigned before the largest one became visible was inserted by a transaction
that held the table's ROW EXCLUSIVE lock when the bound was read, so the drain waits for every such holder to
end (as pg_incremental does; CREATE INDEX CONCURRENTLY waits the same way), and only then reads the range.

The range's keys go into the change log like a trigger's, in one transaction; the refresh that follows claims
them with the rest. The new watermark goes into the view's marker with that refresh's state, so a refresh that
fails leaves the old one and the next drain reads the same rows again: keys written twice are recomputed to the
same rows. Without a watermark yet (the first refresh after capture was installed), the drain requests a full
rebuild, whose snapshot holds every row up to the bound.

Runs under the view's lock, as the role that builds the view (spec.runAsRole): the rows it reads are the rows
the query may read. Every name it sends is schema-qualified, every operator pg_catalog's: a writer's planted
``max`` or ``>`` never runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from psycopg import sql

from matview.api import sqltext
from matview.api.spec import KeySource, MaterializedView
from matview.errors import MatviewError
from matview.plan import capture, session
from matview.plan.executor import ExecutionSettings
from matview.plan.observed import Connection

#: Why a refresh rebuilds in full when an append-only source has no watermark yet.
NO_WATERMARK = "an append-only source has no watermark yet"

# The bound (a snapshot taken when the statement starts) and, read after it, the sessions holding the table's
# ROW EXCLUSIVE lock: every writer that could still commit a row at or below the bound is one of them.
_BOUND_AND_WRITERS = sql.SQL("""
SELECT (SELECT pg_catalog.max(s.{column}) FROM {table} AS s),
       ARRAY(SELECT l.virtualtransaction FROM pg_catalog.pg_locks AS l
             WHERE l.locktype OPERATOR(pg_catalog.=) 'relation'
               AND l.database OPERATOR(pg_catalog.=) (
                     SELECT d.oid FROM pg_catalog.pg_database AS d
                     WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database())
               AND l.relation OPERATOR(pg_catalog.=) pg_catalog.to_regclass(%(table)s)
               AND l.mode OPERATOR(pg_catalog.=) 'RowExclusiveLock'
               AND l.granted
               AND l.pid OPERATOR(pg_catalog.<>) pg_catalog.pg_backend_pid())
""")

# The column's own sequence (the dependency pg_get_serial_sequence follows): how many values it hands a session
# at once, and the last one it gave (NULL before its first, and after a RESTART). Read as the operator's role,
# which apply checked may read it. No row: the column owns no sequence any more.
_SEQUENCE = sql.SQL("""
SELECT q.seqcache, pg_catalog.pg_sequence_last_value(q.seqrelid)
FROM pg_catalog.pg_sequence AS q
WHERE q.seqrelid OPERATOR(pg_catalog.=)
      pg_catalog.to_regclass(pg_catalog.pg_get_serial_sequence(%(table)s, %(column)s))
""")

# A transaction keeps its locks until it ends (a prepared one, until COMMIT PREPARED): while any lock of it is
# listed, it may still commit rows.
_STILL_RUNNING = sql.SQL("""
SELECT pg_catalog.array_agg(DISTINCT l.virtualtransaction) FROM pg_catalog.pg_locks AS l
WHERE l.virtualtransaction OPERATOR(pg_catalog.=) ANY(%s::pg_catalog.text[])
""")

#: The first pause between two looks at the writers in flight; doubled up to the last.
_FIRST_PAUSE_SECONDS, _LAST_PAUSE_SECONDS = 0.002, 0.05


class WritersInFlight(MatviewError):
    """Writers of an append-only source were still in flight when the wait for them ran out."""


def append_only_sources(view: MaterializedView) -> list[KeySource]:
    if view.incremental is None:
        return []
    return [source for source in view.incremental.sources if source.append_only_column is not None]


def source_label(source: KeySource) -> str:
    """A source's key in the marker's watermarks."""
    return sqltext.qualified_label(*source.relation)


def drain(
    conn: Connection,
    view: MaterializedView,
    settings: ExecutionSettings,
    watermarks: Mapping[str, int | None],
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, int | None]:
    """Write the keys of the rows appended to each append-only source since watermarks into the change log
    (the caller holds the view's lock); return the watermarks to record with the refresh's success (None for a
    source with no rows: every row it will have is new)."""
    sources = append_only_sources(view)
    with session.one_batch(conn), session.transaction_in_batch(conn):
        sequences = {
            source_label(source): conn.execute(
                _SEQUENCE,
                {"table": sql.Identifier(*source.relation).as_string(conn), "column": source.append_only_column},
            )
            for source in sources
        }
        _act_as_builder(conn, view, settings)
        cursors = {
            source_label(source): conn.execute(
                _BOUND_AND_WRITERS.format(
                    column=sql.Identifier(source.append_only_column or ""), table=sql.Identifier(*source.relation)
                ),
                {"table": sql.Identifier(*source.relation).as_string(conn)},
            )
            for source in sources
        }
    found: dict[str, tuple[int | None, _Sequence | None]] = {}
    writers: dict[str, list[str]] = {}
    for label, cursor in cursors.items():
        row, given = cursor.fetchone(), sequences[label].fetchone()
        assert row is not None
        sequence = _Sequence(int(given[0]), int(given[1]) if given[1] is not None else None) if given else None
        found[label] = (int(row[0]) if row[0] is not None else None, sequence)
        writers[label] = [str(v) for v in row[1]]
    _wait_for(conn, view, writers, settings.lock_timeout_seconds, sleep)
    rebuild = [NO_WATERMARK] if any(label not in watermarks for label in found) else []
    reads: list[tuple[KeySource, int | None, int]] = []
    recorded: dict[str, int | None] = {}
    for source in sources:
        label = source_label(source)
        upto, sequence = found[label]
        recorded[label] = _next_watermark(upto, sequence)
        unsafe = _unsafe(source, watermarks.get(label), sequence)
        if unsafe:
            rebuild.append(unsafe)
        if label not in watermarks:
            continue
        after = watermarks[label]
        if upto is not None and (after is None or upto > after):
            reads.append((source, after, upto))
    if reads or rebuild:  # nothing appended (a quiet table, a target lag's frequent looks): no transaction
        with session.one_batch(conn), session.transaction_in_batch(conn):
            _act_as_builder(conn, view, settings)
            for source, after, upto in reads:
                conn.execute(*_range_keys(view, source, after, upto))
            for reason in rebuild:
                conn.execute(capture.request_full_rebuild(view, reason))
    return recorded


@dataclass(frozen=True)
class _Sequence:
    cache: int
    last_value: int | None
    """None before the sequence gave its first value, and after a RESTART."""


def _next_watermark(bound: int | None, sequence: _Sequence | None) -> int | None:
    """What the next range starts after: the largest value read, but never past the sequence's last value. A
    row given a value by hand above the sequence (a serial or BY DEFAULT identity takes one) would otherwise
    raise the watermark over every value the sequence gives next, and those rows would never be read; kept at
    the sequence, each refresh reads that row again (its key is recomputed to the same rows) until the
    sequence passes it. No sequence value yet: None, every row is read again."""
    if bound is None or sequence is None or sequence.last_value is None:
        return None
    return min(bound, sequence.last_value)


def _unsafe(source: KeySource, watermark: int | None, sequence: _Sequence | None) -> str:
    """Why the rows above watermark may not be all the rows the last refresh has not read, so this one must
    rebuild in full ("" when they are). Apply checked the sequence; its owner can change it since."""
    column = f"{source.schema}.{source.table}.{source.append_only_column}"
    if sequence is None:
        return f"{column} owns no sequence any more: rows may take values no range would read"
    if sequence.cache > 1:
        return (
            f"the sequence of {column} caches {sequence.cache} values per session: a session may insert a value "
            "below one another session committed; ALTER SEQUENCE … CACHE 1"
        )
    if watermark is not None and (sequence.last_value is None or sequence.last_value < watermark):
        now = "its start" if sequence.last_value is None else f"{sequence.last_value}"
        return (
            f"the sequence of {column} went down from {watermark} to {now}: new rows may take values at or below "
            "the watermark"
        )
    return ""


def _act_as_builder(conn: Connection, view: MaterializedView, settings: ExecutionSettings) -> None:
    session.exposed(conn)  # the source's row security policies may run the builder's functions
    role = session.query_role_statement(view)
    if role is not None:
        conn.execute(role)
    session.local_statement_timeout(conn, settings.statement_timeout_seconds)


def _range_keys(
    view: MaterializedView, source: KeySource, after: int | None, upto: int
) -> tuple[sql.Composed, dict[str, int | None]]:
    """One log row holding the keys of source's rows in (after, upto] (after None: every row up to upto);
    nothing when there are none. Keys with a NULL part go in as they are: the log's rule for them (a full
    rebuild) applies."""
    assert view.incremental is not None
    column = sql.Identifier("s", source.append_only_column or "")
    keys = view.incremental.key_columns
    lower = (
        sql.SQL("{} OPERATOR(pg_catalog.>) %(after)s::pg_catalog.int8 AND ").format(column)
        if after is not None
        else sql.SQL("")
    )
    statement = sql.SQL(
        "INSERT INTO {log} ({keys}) SELECT {aggregates} FROM {table} AS s "
        "WHERE {lower}{column} OPERATOR(pg_catalog.<=) %(upto)s::pg_catalog.int8 "
        "HAVING pg_catalog.count(*) OPERATOR(pg_catalog.>) 0"
    ).format(
        log=capture.changes_id(view),
        keys=capture.key_list(keys),
        aggregates=sql.SQL(", ").join(
            sql.SQL("pg_catalog.array_agg({})").format(sql.Identifier("s", c)) for c in source.columns
        ),
        table=sql.Identifier(*source.relation),
        lower=lower,
        column=column,
    )
    return statement, {"after": after, "upto": upto}


def _wait_for(
    conn: Connection,
    view: MaterializedView,
    writers: dict[str, list[str]],
    timeout_seconds: float,
    sleep: Callable[[float], None],
) -> None:
    """Until every transaction in writers has ended; WritersInFlight after timeout_seconds."""
    waiting = sorted({transaction for found in writers.values() for transaction in found})
    deadline, pause = time.monotonic() + timeout_seconds, _FIRST_PAUSE_SECONDS
    while waiting:
        row = conn.execute(_STILL_RUNNING, (waiting,)).fetchone()
        running = row[0] if row is not None and row[0] is not None else []
        if not running:
            return
        if time.monotonic() >= deadline:
            tables = ", ".join(label for label, found in sorted(writers.items()) if found)
            raise WritersInFlight(
                f"{view.relation}: writers of the append-only source(s) {tables} were still in flight after "
                f"{timeout_seconds:g}s (virtual transaction(s) {', '.join(sorted(running))}); rows they commit "
                "could fall below the range this refresh would read, so it reads none until they end "
                "(spec.refresh.lockTimeout bounds this wait)"
            )
        sleep(pause)
        pause = min(pause * 2, _LAST_PAUSE_SECONDS)
