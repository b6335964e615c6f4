"""Read a LogicalDecoding view's replication slot into its change log, before a refresh decides.

Runs under the view's lock (a slot serves one reader at a time, and two drains would advance it past each
other); only a refresh's advance, sent once its keys have committed, may still be running when the lock goes
with the refresh's last transaction, and a drain that then finds the slot in use is busy. Order is what makes
it safe: the LSN to read up to is taken first; the changes up to it are peeked, not consumed, and their keys
written to the change log in one transaction; only after that commits does the slot advance to the LSN. Killed
between the commit and the advance, the next drain reads the same changes again and writes the same keys
again, which a refresh recomputes to the same rows.

Anything that makes the slot's changes unreadable (the slot missing or invalidated, the publication
dropped or altered, a message this parser cannot read) ends the same way: the capture is made again by the
same steps apply uses (plan/converge.converge_decoding, with a new slot) and a full rebuild is requested,
so a lost change becomes a rebuild, never a stale row.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import weakref
from typing import Any

import psycopg
from psycopg import sql

from matview.api.spec import MaterializedView
from matview.plan import catalog, decoding, session
from matview.plan.converge import converge_decoding
from matview.plan.executor import BusyError, ExecutionSettings, execute
from matview.plan.observed import Connection, Observed
from matview.plan.statements import Plan

logger = logging.getLogger(__name__)

#: Rows fetched from the peek at a time, and written to the log as one row: bounds the operator's memory
#: whatever the size of a batch a writer committed.
FETCH_ROWS = 10_000

_CURRENT_USER = sql.SQL("SELECT current_user")
# A cursor of the transaction (gone at its end), declared and read with plain statements so that the
# declaration and the first rows travel in one message with the flush and the read point.
_CURSOR = sql.Identifier("matview_drain")
_DECLARE = sql.SQL("DECLARE {} NO SCROLL CURSOR FOR ").format(_CURSOR)
_FETCH = sql.SQL("FETCH FORWARD {} FROM {}").format(sql.Literal(FETCH_ROWS), _CURSOR)

#: Whether each connection's role may run pg_log_standby_snapshot() (decoding.MAY_LOG_SNAPSHOT_QUERY),
#: asked once per connection: the answer decides what the drain's first round trip sends.
_MAY_LOG_SNAPSHOT: weakref.WeakKeyDictionary[Connection, bool] = weakref.WeakKeyDictionary()


def slot_query(view: MaterializedView) -> tuple[sql.Composed, dict[str, str]]:
    """The look at the slot and the publication (decoding.SLOT_QUERY) for view: a refresh reads it in the batch
    that takes the view's lock and hands its row to ``drain``."""
    return decoding.SLOT_QUERY, {"slot": decoding.slot_name(view), "publication": decoding.publication_name(view)}


def drain(
    conn: Connection,
    view: MaterializedView,
    settings: ExecutionSettings,
    reader: Connection | None = None,
    meanwhile: contextlib.ExitStack | None = None,
    looked: tuple[Any, ...] | None = None,
) -> int | None:
    """Move the slot's changes up to now into the change log (the caller holds the view's lock on conn); return
    the WAL the slot still holds, in bytes. ``looked`` is the row of ``slot_query`` read under that lock (read here
    when not given). ``reader``, another connection to the same database, reads the slot (see
    refresh.attempt.Aside); without one, conn does. With ``meanwhile`` too, the slot's advance is sent on the
    reader once the keys have committed, and its answer is read when meanwhile closes (before the reader goes back
    to its pool): the server advances the slot while the refresh runs on conn, instead of before it. Raises
    BusyError when another session is using the slot (the advance of another process's refresh of this view).

    Two round trips on the reader when the changes fit one fetch, one message each: the flush, the read point and
    the peek's first rows; then the keys, their commit and (unless meanwhile) the slot's advance. A message stops
    at its first error, so the advance never runs unless the keys' commit did.

    The look goes on conn, with the lock: a drain empties its reader's catalog caches (logical decoding
    invalidates them after the peek and after the advance), and on the reader the look was planned again over
    empty caches at every drain (1.0 ms of a 4.9 ms drain on PostgreSQL 16)."""
    reader = conn if reader is None else reader
    slot = decoding.slot_name(view)
    publication = decoding.publication_name(view)
    if looked is None:
        looked = tuple(conn.execute(*slot_query(view)).fetchone() or ())
    wal_status, retained, publication_exists, publishes_every_change, tables = looked
    assert view.incremental is not None
    if not publication_exists:
        return _remake(reader, view, settings, f"publication {publication} does not exist")
    if {(str(t[0]), str(t[1])) for t in tables} != {s.relation for s in view.incremental.sources}:
        return _remake(reader, view, settings, f"publication {publication} publishes other tables than the sources")
    if not publishes_every_change:
        return _remake(
            reader,
            view,
            settings,
            f"publication {publication} no longer publishes every change of the sources "
            "(its operations, a row filter or a column list were changed)",
        )
    if wal_status is None:
        return _remake(reader, view, settings, f"replication slot {slot} is missing")
    if wal_status == "lost":
        return _remake(
            reader,
            view,
            settings,
            f"replication slot {slot} was invalidated (max_slot_wal_keep_size): its changes are lost",
        )
    try:
        advance = _read(reader, view, settings, later=meanwhile is not None and reader is not conn)
        if advance is not None and meanwhile is not None:
            meanwhile.enter_context(_Advance(reader, view, advance))
    except psycopg.errors.ObjectInUse as error:
        # Only one session may use a slot at a time. Since the view's lock is ours, the other is the advance of
        # another process's refresh of this view, which has released the lock but not yet heard back from it.
        raise BusyError(f"{view.relation}: replication slot {slot} is in use ({error.diag.message_primary})") from None
    except decoding.DecodeError as error:
        return _remake(reader, view, settings, f"a change in replication slot {slot} could not be read ({error})")
    except (psycopg.errors.UndefinedObject, psycopg.errors.ObjectNotInPrerequisiteState) as error:
        # The publication was dropped (its name is looked up as of each change: a new one with the same name
        # does not help this slot), or the slot was invalidated or dropped since the look.
        message = error.diag.message_primary or str(error)
        return _remake(reader, view, settings, f"replication slot {slot} cannot be read: {message}")
    return _bytes(retained)


def _read(conn: Connection, view: MaterializedView, settings: ExecutionSettings, later: bool = False) -> str | None:
    """Make every committed write readable (and, where the role may, let the slot restart after it), then the
    slot's changes up to the flushed WAL into the log, committed, then the slot advanced past what was read; or,
    later, the LSN to advance it to, for the caller to send. Any error rolls the transaction back (the slot does
    not advance) before it goes on."""
    may_log_snapshot = _may_log_snapshot(conn)
    slot = decoding.slot_name(view)
    reasons: list[str] = []
    message = session.Message(conn)
    try:
        session.start_transaction(conn, message)
        if may_log_snapshot:
            message.add(decoding.LOG_SNAPSHOT_QUERY)
        message.add(decoding.FLUSH_QUERY)
        message.add(session.COMMIT)
        session.start_transaction(conn, message)  # a second transaction in the same message: the flush committed
        message.add(*session.local_statement_timeout_query(settings.statement_timeout_seconds))
        read_point_at = message.add(decoding.READ_POINT_QUERY)
        message.add(_DECLARE + decoding.PEEK_QUERY, {"slot": slot, "publication": decoding.publication_option(view)})
        fetched_at = message.add(_FETCH)
        sent = message.send()
        read_point = session.result_of(sent, read_point_at).fetchone()
        assert read_point is not None
        snapshot, upto = str(read_point[0]), str(read_point[1])
        batch = session.result_of(sent, fetched_at - read_point_at).fetchall()
        decoder = decoding.Decoder(view, decoding.Snapshot.parse(snapshot))
        advance_to = decoding.lsn_value(upto)
        while True:
            changes = decoding.Changes()
            for (data,) in batch:
                decoder.feed(bytes(data), changes)
            if changes.keys:
                # A batch may start inside a transaction: its Begin (and commit time) came before.
                committed = changes.oldest_commit or decoder.commit_time or dt.datetime.now(dt.UTC)
                document = decoding.log_document(view, changes.keys, committed)
                message.add(decoding.insert_keys_statement(view), (document,))
            reasons += changes.rebuild
            if changes.unseen_commit_lsn is not None:
                advance_to = min(advance_to, changes.unseen_commit_lsn)
            if len(batch) < FETCH_ROWS:
                break
            fetched_at = message.add(_FETCH)
            batch = session.result_of(message.send(), fetched_at).fetchall()
        for reason in sorted(set(reasons)):
            message.add(decoding.request_rebuild_statement(view), (reason,))
        message.add(session.COMMIT)
        if advance_to < decoding.lsn_value(upto):
            # Its keys are in the log already; the refresh will not see its rows, so the next drain reads it again.
            logger.info(
                "%s: slot held at %s for a commit not yet visible", view.relation, decoding.lsn_text(advance_to)
            )
        if not later:
            message.add(decoding.ADVANCE_QUERY, {"slot": slot, "upto": decoding.lsn_text(advance_to)})
        message.send()
    except psycopg.errors.InsufficientPrivilege:
        session.roll_back(conn)
        if not may_log_snapshot:
            raise
        # Denied something in the message: if it was the snapshot (EXECUTE revoked since this connection asked),
        # drain without it from now on; anything else goes on as the error it is.
        del _MAY_LOG_SNAPSHOT[conn]
        if _may_log_snapshot(conn):
            raise
        return _read(conn, view, settings, later)
    except BaseException:
        session.roll_back(conn)
        raise
    return decoding.lsn_text(advance_to) if later else None


class _Advance(contextlib.AbstractContextManager["_Advance"]):
    """The slot's advance, sent at once in a pipeline and read back at the end of the with block.

    The server runs a statement as it arrives: the pipeline only defers reading its answer. The keys it advances
    past have committed already, so an advance that fails or never runs (the connection lost, the refresh
    cancelled) loses nothing: the next drain reads the same changes again and writes the same keys, which a
    refresh recomputes to the same rows. It is a warning, not the refresh's failure."""

    def __init__(self, conn: Connection, view: MaterializedView, upto: str) -> None:
        self._view, self._upto = view, upto
        pipeline = conn.pipeline()
        pipeline.__enter__()
        self._pipeline: contextlib.AbstractContextManager[psycopg.Pipeline] | None = pipeline
        try:
            conn.execute(decoding.ADVANCE_QUERY, {"slot": decoding.slot_name(view), "upto": upto})
        except psycopg.Error as error:  # could not even be sent (the connection lost): the same as failing
            self._end(error)
            self._warn(error)
        except BaseException as error:
            self._end(error)
            raise

    def __exit__(self, *_: object) -> None:
        try:
            self._end(None)
        except psycopg.Error as error:
            self._warn(error)

    def _end(self, pending: BaseException | None) -> None:
        """Leave the pipeline, reading the advance's answer; with an error pending, psycopg only logs its own."""
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            pipeline.__exit__(type(pending) if pending else None, pending, None)

    def _warn(self, error: psycopg.Error) -> None:
        logger.warning(
            "%s: the replication slot's advance to %s failed (%s); the next drain reads its changes again",
            self._view.relation,
            self._upto,
            error,
        )


def _may_log_snapshot(conn: Connection) -> bool:
    """Whether conn's role may run pg_log_standby_snapshot(): asked once per connection (the answer decides what
    the drain's first message sends)."""
    may_log_snapshot = _MAY_LOG_SNAPSHOT.get(conn)
    if may_log_snapshot is None:
        may_log_snapshot = False
        if conn.info.server_version >= decoding.LOG_SNAPSHOT_MIN_VERSION:
            allowed = conn.execute(decoding.MAY_LOG_SNAPSHOT_QUERY).fetchone()
            may_log_snapshot = allowed is not None and bool(allowed[0])
        _MAY_LOG_SNAPSHOT[conn] = may_log_snapshot
    return may_log_snapshot


def _remake(conn: Connection, view: MaterializedView, settings: ExecutionSettings, why: str) -> int | None:
    """A new slot (and the publication made again where it is not as apply makes it), and a full rebuild."""
    logger.warning("%s: %s; capture is made again and the view rebuilt in full", view.relation, why)
    row = conn.execute(_CURRENT_USER).fetchone()
    observed = Observed(current_user=str(row[0]) if row else "", decoding=catalog.read_decoding(conn, view))
    steps = converge_decoding(view, observed, [], force_new_slot=True, built=True, why=why)
    execute(conn, Plan(view, tuple(steps), (why,), log_steps=False), settings)  # a failure fails the refresh
    row = conn.execute(*slot_query(view)).fetchone()
    return _bytes(row[1]) if row else None


def _bytes(value: object) -> int | None:
    return int(value) if isinstance(value, int) else None
