"""How every database session the engine opens is configured, in one place.

Every statement the engine sends — catalog reads, marker writes, lock calls, not only the ones that
compile the user's query — runs with ``search_path = pg_catalog, pg_temp``. With the server's default
(``"$user", public``), any role allowed to CREATE in ``public`` (the default before PostgreSQL 15, and kept
by upgrades) could plant a better-matching ``public.obj_description(oid, text)`` or
``public.unnest(int[])`` and have it run as the operator on its next catalog read. The pin is set when a
connection is made and again whenever the session is reset or the user's query may have changed it
(a SELECT can call ``set_config('search_path', …, false)``); ``spec.searchPath`` is added, transaction
locally, only where the user's query is compiled (``pin_name_resolution`` below).

It is set with a statement rather than the ``options`` startup parameter, which PgBouncer refuses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from matview.api import sqltext
from matview.api.spec import MaterializedView, RefreshSpec
from matview.constants import APPLICATION_NAME
from matview.plan.observed import Connection

#: The session's search_path for every statement the engine sends itself.
ENGINE_SEARCH_PATH = "pg_catalog, pg_temp"

#: How often the server checks that the client of a long statement is still there (PostgreSQL 14+): when
#: a process is killed mid-refresh, its build stops within seconds instead of running to statement_timeout
#: while holding the view's lock.
CLIENT_CHECK_INTERVAL = "2s"


def _milliseconds(seconds: float) -> str:
    """A duration as PostgreSQL's timeout settings take it."""
    return f"{int(seconds * 1000)}ms"


#: How long any statement the engine sends outside a step (whose settings are its view's) may wait for a lock:
#: the lock's take, the inspection and the drains read the catalogs and the view's tables before a step sets
#: its own timeouts, and a session holding ACCESS EXCLUSIVE on the view kept a refresh there for as long as it
#: liked. The same as spec.refresh.lockTimeout's default.
SESSION_LOCK_TIMEOUT = _milliseconds(RefreshSpec.lock_timeout_seconds)

_PIN = sql.SQL(
    "SELECT pg_catalog.set_config('search_path', {path}, false), pg_catalog.set_config('lock_timeout', {lock}, false)"
).format(path=sql.Literal(ENGINE_SEARCH_PATH), lock=sql.Literal(SESSION_LOCK_TIMEOUT))
_PIN_AND_CHECK = _PIN + sql.SQL(", pg_catalog.set_config('client_connection_check_interval', {}, false)").format(
    sql.Literal(CLIENT_CHECK_INTERVAL)
)
_AND_UNLOCK = sql.SQL(", pg_catalog.pg_advisory_unlock_all()")


def configure_statement(conn: Connection, release_advisory_locks: bool = False) -> sql.Composed:
    """The statement that configures a session: the pinned search_path, and the client check where the
    server has it (PostgreSQL 13 and older do not); with release_advisory_locks, the same statement also
    releases every session advisory lock (part of IN_BAND_CLEANUP, without a statement of its own)."""
    pin = _PIN_AND_CHECK if conn.info.server_version >= 140000 else _PIN
    return pin + _AND_UNLOCK if release_advisory_locks else pin


def configure(conn: Connection, release_advisory_locks: bool = False) -> None:
    """Configure the session (a new connection, or after a reset or the user's query): one round trip."""
    conn.execute(configure_statement(conn, release_advisory_locks))


#: DISCARD ALL without its DEALLOCATE ALL and DISCARD PLANS: everything a query can leave behind in a
#: session (held advisory locks, settings, a role, cursors, LISTENs, temporary objects, sequence state)
#: goes, while the engine's prepared catalog reads stay planned. Every name is qualified: until RESET ALL
#: the search_path is whatever the user's query left. Each statement may also run inside a transaction, which
#: is how a refresh's last transaction resets the session in band (``reset_in_band``).
_RESET_STATEMENTS = (
    sql.SQL("CLOSE ALL"),
    sql.SQL("SET SESSION AUTHORIZATION DEFAULT"),
    sql.SQL("RESET ALL"),
    sql.SQL("UNLISTEN *"),
    sql.SQL("DISCARD TEMP"),
    sql.SQL("DISCARD SEQUENCES"),
)

#: The prepared statements, so that one the user's query made (PREPARE through EXECUTE in a function) or
#: removed (DEALLOCATE) is seen: from SQL, and from the protocol (psycopg's own, which it must still know).
_PREPARED_COUNTS = sql.SQL(
    "SELECT (SELECT pg_catalog.count(*) FROM pg_catalog.pg_prepared_statements p WHERE p.from_sql), "
    "(SELECT pg_catalog.count(*) FROM pg_catalog.pg_prepared_statements p WHERE NOT p.from_sql)"
)

#: The reset as one message; the session is configured again (and its advisory locks released) before the count.
_RESETS = {
    with_check: sql.SQL("; ").join(
        [*_RESET_STATEMENTS, (_PIN_AND_CHECK if with_check else _PIN) + _AND_UNLOCK, _PREPARED_COUNTS]
    )
    for with_check in (True, False)
}


#: What a refresh's last transaction runs instead of the reset, when the user's SQL ran only inside REFRESH
#: MATERIALIZED VIEW since the connection was last reset (``Step.restricted_user_sql``). REFRESH runs the query as
#: a security-restricted operation: PostgreSQL refuses SET ROLE and SESSION AUTHORIZATION, PREPARE,
#: DEALLOCATE, LISTEN, temporary tables and WITH HOLD cursors there, and undoes the settings it changed (tested
#: in tests/db/test_session.py). What it can leave is session advisory locks and sequence state: the locks go
#: with the session's configuration (``configure(conn, release_advisory_locks=True)``, one statement fewer a
#: refresh), the sequence state here.
IN_BAND_CLEANUP = (sql.SQL("DISCARD SEQUENCES"),)

#: Connections on which the user's SQL may have run outside a restricted operation since their last reset.
_exposed: weakref.WeakSet[Connection] = weakref.WeakSet()
#: Connections whose last transaction ran IN_BAND_CLEANUP, with nothing sent since by a step.
_cleaned: weakref.WeakSet[Connection] = weakref.WeakSet()


def exposed(conn: Connection) -> None:
    """The user's SQL may run on conn outside a restricted operation: its next reset is a full one."""
    _exposed.add(conn)
    _cleaned.discard(conn)


def step_starts(conn: Connection) -> None:
    """A step whose user SQL is restricted starts: the session is clean again only once its closing commits."""
    _cleaned.discard(conn)


def cleaned_in_band(conn: Connection) -> None:
    """A transaction that ended with IN_BAND_CLEANUP committed: unless the user's SQL ran unrestricted since the
    last reset, the reset before the connection goes back has nothing left to do (one round trip and eight
    statements less a refresh)."""
    if conn not in _exposed:
        _cleaned.add(conn)


def _prepared_here(conn: Connection) -> int | None:
    """How many statements psycopg believes it has prepared on this connection (None if it cannot say)."""
    names = getattr(getattr(conn, "_prepared", None), "_names", None)
    return len(names) if isinstance(names, dict) else None


def reset(conn: Connection) -> None:
    """Return a pooled connection to a clean session before anyone else uses it, in one round trip.

    The user's query runs on these connections and can change session state from a SELECT:
    ``pg_advisory_lock`` (which would make another view look busy forever), ``set_config`` of any
    parameter, a role, and even prepared statements (``EXECUTE 'PREPARE …'`` or ``'DEALLOCATE …'`` in a
    function), which would make psycopg's own prepared statements fail for the next view on this
    connection. _RESET clears all of it but the prepared statements; when those are not exactly psycopg's,
    DISCARD ALL clears them too (psycopg sees it and forgets its own). A connection that cannot be reset is
    closed by ``clean_for_return``, and the pool discards it. Nothing to do after a refresh that cleaned its
    session in band (cleaned_in_band)."""
    if conn in _cleaned:
        _cleaned.discard(conn)
        return
    _exposed.discard(conn)
    sent = conn.execute(_RESETS[conn.info.server_version >= 140000], prepare=False)
    cursor = result_of(sent, len(_RESET_STATEMENTS) + 1)
    if not _prepared_as_known(cursor.fetchone(), _prepared_here(conn)):
        conn.execute(sql.SQL("DISCARD ALL"), prepare=False)
        configure(conn)


def _prepared_as_known(counts: tuple[Any, ...] | None, known: int | None) -> bool:
    """The prepared statements (a row of _PREPARED_COUNTS) are exactly the known number of psycopg's own."""
    return counts is not None and not counts[0] and known is not None and counts[1] == known


@dataclasses.dataclass(frozen=True)
class InBandReset:
    """A reset queued in a transaction's message (``reset_in_band``)."""

    position: int
    """Where the prepared statements' count is in the message."""
    prepared: int | None
    """The statements psycopg had prepared when the message was built (nothing in a message is), compared with the
    server's count: psycopg's own are known as they were when the message went, whatever the results make it do."""


def reset_in_band(conn: Connection, message: Message) -> InBandReset:
    """Queue the reset at the end of a transaction's message, after its last statement of the engine's and before
    its COMMIT: the session is configured again and its advisory locks released. Give the count's row to
    ``reset_in_band_committed`` once the transaction has committed. One round trip less than a reset before the
    connection goes back, for a refresh whose user SQL ran unrestricted (a Swap's build, an incremental apply)."""
    for statement in _RESET_STATEMENTS:
        message.add(statement)
    message.add(configure_statement(conn, release_advisory_locks=True))
    return InBandReset(message.add(_PREPARED_COUNTS), _prepared_here(conn))


def reset_in_band_committed(conn: Connection, reset: InBandReset, counts: tuple[Any, ...] | None) -> None:
    """The transaction with ``reset_in_band`` committed: the session is clean, unless the user's query changed the
    prepared statements (then the reset before the connection goes back does it all, DISCARD ALL included)."""
    if _prepared_as_known(counts, reset.prepared):
        _exposed.discard(conn)
        _cleaned.add(conn)


_LOCAL_STATEMENT_TIMEOUT = sql.SQL("SELECT pg_catalog.set_config('statement_timeout', %s, true)")


def local_statement_timeout(conn: Connection, seconds: float) -> None:
    """Inside a transaction: bound its statements by seconds, and nothing else (not ``step_settings``, which also
    widens search_path to spec.searchPath, which only the user's query may see: the drains send every name
    schema-qualified and run on the pinned pg_catalog, pg_temp)."""
    conn.execute(*local_statement_timeout_query(seconds))


def local_statement_timeout_query(seconds: float) -> tuple[sql.SQL, tuple[object, ...]]:
    """The statement of ``local_statement_timeout``, with its parameter (for a ``Message``)."""
    return _LOCAL_STATEMENT_TIMEOUT, (_milliseconds(seconds),)


_STEP_SETTINGS = sql.SQL(
    "SELECT pg_catalog.set_config('statement_timeout', %s, %s), pg_catalog.set_config('lock_timeout', %s, %s), "
    "pg_catalog.set_config('search_path', %s, %s)"
)


def step_settings_query(
    view: MaterializedView, statement_seconds: float, lock_seconds: float, local: bool
) -> tuple[sql.SQL, tuple[object, ...]]:
    """The statement of ``step_settings``, with its parameters."""
    return _STEP_SETTINGS, (
        _milliseconds(statement_seconds),
        local,
        _milliseconds(lock_seconds),
        local,
        sqltext.pinned_search_path(view.search_path),
        local,
    )


def step_settings(
    conn: Connection, view: MaterializedView, statement_seconds: float, lock_seconds: float, local: bool
) -> None:
    """A step's timeouts and the view's name resolution (sqltext.pinned_search_path), in one round trip:
    transaction-local, or for the session (CONCURRENTLY steps, which run outside a transaction; then
    ``restore`` puts the session back)."""
    conn.execute(*step_settings_query(view, statement_seconds, lock_seconds, local))


_BEGIN, COMMIT, _ROLLBACK = sql.SQL("BEGIN"), sql.SQL("COMMIT"), sql.SQL("ROLLBACK")


def _refuse_open_transaction(conn: Connection, what: str) -> None:
    """A transaction of the engine's own starts only where none is open: its BEGIN would only warn inside the
    caller's, and its COMMIT would end that one."""
    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise psycopg.ProgrammingError(f"{what}: a transaction is already open on this connection")


def start_transaction(conn: Connection, message: Message) -> None:
    """Queue the BEGIN of a transaction in message (committed by a ``COMMIT`` the caller queues; ``roll_back``
    after an error). Only where no transaction is open."""
    _refuse_open_transaction(conn, "start_transaction")
    message.add(_BEGIN)


def roll_back(conn: Connection) -> None:
    """After an error: roll back the transaction it left open or failed (nothing when none is)."""
    if conn.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
        with contextlib.suppress(psycopg.Error):
            conn.execute(_ROLLBACK, prepare=False)


def clean_for_return(conn: Connection) -> None:
    """Before a pooled connection goes back to its pool, in the thread that used it: a transaction left open or
    failed rolled back, then ``reset``; a connection that cannot be made clean is closed (the pool discards it).

    The pool could call ``reset`` itself, but then it returns every connection through one of its worker threads:
    one more thread woken, and one more wait for the interpreter's lock, each refresh; and the lane's next
    checkout could find its connection not back yet."""
    if conn.closed:
        return
    try:
        roll_back(conn)
        if conn.info.transaction_status != TransactionStatus.IDLE:  # a statement still running, the connection lost
            conn.close()
            return
        reset(conn)
    except Exception:
        conn.close()


@contextlib.contextmanager
def one_batch(conn: Connection) -> Iterator[psycopg.Pipeline]:
    """A pipeline for statements that go to the server together, with the transactions of
    ``transaction_in_batch``: one round trip, plus one for each sync or fetch the block asks for. Whatever
    error ends it, it leaves no transaction open: one it left failed, or open because the block raised
    before its COMMIT, is rolled back before the error goes on."""
    try:
        with conn.pipeline() as pipeline:
            yield pipeline
    except BaseException:
        roll_back(conn)
        raise


@contextlib.contextmanager
def transaction_in_batch(conn: Connection) -> Iterator[None]:
    """Inside ``one_batch``: a transaction whose BEGIN and COMMIT are statements of the batch.

    psycopg's ``transaction()`` inside a pipeline opens a nested pipeline on each side of the block and each
    syncs: a transaction of three statements took three round trips, and a Swap's three transactions fifteen
    (traced). Here an error skips the rest of the batch, COMMIT included, and ``one_batch`` rolls back. Only
    where no transaction is open, and the block must not open a ``transaction()`` of its own: the server is
    in this one before psycopg can see it."""
    _refuse_open_transaction(conn, "transaction_in_batch")
    conn.execute(_BEGIN, prepare=False)
    yield
    conn.execute(COMMIT, prepare=False)


class Message:
    """Statements that go to the server as one simple-protocol Query message: one round trip and one wait.

    In a pipeline psycopg waits on the socket once for every statement it queues, and each wait lets go of the
    interpreter's lock: a refresh's transaction of ten statements made ten waits. In a process where other threads
    run Python (the other lanes, the event loop), every one of them may wait for the lock to come back, and the
    engine's refresh in ``matview run`` took 10.7 ms of a lane against 8 ms in two plain threads. A simple Query
    holds any number of statements, in order, and stops at the first error (``send`` raises it).

    The simple protocol takes no parameters, so a statement's values are bound by psycopg's own client-side
    adaptation (``ClientCursor.mogrify``: the connection's quoting, the same adapters as server-side parameters),
    never by string formatting; statements without values go as composed. Each statement is complete on its own
    (the engine's constants, identifiers, literals, and the user's text only as sqltext re-printed it, with no
    comment or open quote), and a newline ends each, so none can reach into the next. Nothing in a message is
    prepared: a statement whose planning costs (a large catalog read) belongs in a pipeline instead.

    psycopg forgets every statement it prepared on a connection (and deallocates them) when it sees a DROP or an ALTER
    in a result, lest a prepared statement's columns change under it: a Swap then planned the lock's inspection read
    again on every refresh (the lock with its read took 2.7 to 3.0 ms instead of 1.0). A message goes with psycopg's
    preparing off, so it keeps them. What the engine prepares are its reads of the catalog, of its own tables and
    of counts, whose columns no DDL of a view changes; PostgreSQL plans them again by itself when what they read
    changed.
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._binder = psycopg.ClientCursor(conn)
        self._parts: list[bytes] = []

    def add(
        self, statement: sql.SQL | sql.Composed, parameters: Sequence[Any] | Mapping[str, Any] | None = None
    ) -> int:
        """Queue a statement; its result's position in the next ``send``."""
        if parameters is None:
            self._parts.append(statement.as_bytes(self._conn))
        else:
            self._parts.append(self._binder.mogrify(statement, parameters).encode(self._conn.info.encoding))
        return len(self._parts) - 1

    def send(self) -> psycopg.Cursor[Any]:
        """Run the queued statements (one round trip): a cursor on the first one's result (``result_of`` moves it)."""
        text, self._parts = b"\n;\n".join(self._parts), []
        threshold, self._conn.prepare_threshold = self._conn.prepare_threshold, None
        try:
            return self._conn.execute(text, prepare=False)
        finally:
            self._conn.prepare_threshold = threshold


def result_of(cursor: psycopg.Cursor[Any], position: int) -> psycopg.Cursor[Any]:
    """cursor, moved to the result of the statement at position of the message it ran (``Message.add``)."""
    for _ in range(position):
        cursor.nextset()
    return cursor


def restore(conn: Connection) -> None:
    """After a step that set its settings for the session: the session's timeouts and configuration back."""
    conn.execute(
        sql.SQL("RESET statement_timeout; RESET lock_timeout; {}").format(configure_statement(conn)), prepare=False
    )


def connection_kwargs(connect_timeout: int = 10) -> dict[str, object]:
    """What every engine connection is opened with: autocommit, and a name in pg_stat_activity."""
    return {"autocommit": True, "application_name": APPLICATION_NAME, "connect_timeout": connect_timeout}


def connect(dsn: str, connect_timeout: int = 10) -> Connection:
    """A configured connection in autocommit mode that says who it is in pg_stat_activity."""
    conn: Connection = psycopg.connect(dsn, **connection_kwargs(connect_timeout))  # type: ignore[arg-type]
    try:
        configure(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def pin_name_resolution(conn: Connection, view: MaterializedView, local: bool) -> None:
    """Compile user SQL under sqltext.pinned_search_path, never the session's default search_path
    (the executor for every step, observe for describing the query)."""
    exposed(conn)
    conn.execute(
        sql.SQL("SELECT set_config('search_path', %s, %s)"), (sqltext.pinned_search_path(view.search_path), local)
    )


def query_role_statement(view: MaterializedView) -> sql.Composed | None:
    """SET LOCAL ROLE spec.runAsRole (None when the spec names none); the caller marks the session ``exposed``."""
    if view.run_as_role is None:
        return None
    return sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(view.run_as_role))


def become_query_role(conn: Connection, view: MaterializedView) -> None:
    """Inside a transaction: act as spec.runAsRole until it ends (nothing when the spec names none)."""
    exposed(conn)
    statement = query_role_statement(view)
    if statement is not None:
        conn.execute(statement)
