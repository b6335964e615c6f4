"""Execute: run a plan's steps with the safety settings every step needs.

Transactional steps run in one transaction each; CONCURRENTLY steps run in
autocommit, as PostgreSQL requires. Every step gets ``statement_timeout``;
steps that wait for an ACCESS EXCLUSIVE lock get ``lock_timeout`` and are
retried with backoff, because while such a lock request waits every new reader
queues behind it — a short timeout and a retry never cause an outage.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from matview.api import sqltext
from matview.api.spec import MaterializedView, RefreshSpec
from matview.errors import ApplyError, MatviewError, UnmanagedObjectError
from matview.plan import session, versions
from matview.plan.observed import Connection
from matview.plan.statements import FromRows, Plan, Query, Step, StepItem

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExecutionSettings:
    """Timeouts and retry policy for executing plans."""

    statement_timeout_seconds: float = RefreshSpec.timeout_seconds
    """Upper bound for any one statement (builds, index creation)."""
    lock_timeout_seconds: float = RefreshSpec.lock_timeout_seconds
    """How long a step may wait for a lock before it gives up and retries."""
    lock_retries: int = 5
    """Attempts for steps that take an exclusive lock, before the failure is reported."""
    backoff_seconds: float = 0.2
    """First pause between attempts; doubled each time, with jitter."""


def run_with_lock_retries(
    operation: Callable[[], None], settings: ExecutionSettings, what: str, sleep: Callable[[float], None] = time.sleep
) -> None:
    """Run operation; when it fails for a lock timeout, or as the victim of a deadlock (a reader or autovacuum
    holding a table the step's exclusive lock needs while it waits for one the step holds: the transaction
    was rolled back whole), wait and try again a bounded number of times."""
    delay = settings.backoff_seconds
    for attempt in range(1, settings.lock_retries + 1):
        try:
            operation()
            return
        except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected) as error:
            if attempt == settings.lock_retries:
                raise
            logger.info(
                "%s: %s (attempt %d/%d); retrying",
                what,
                "chosen to end a deadlock"
                if isinstance(error, psycopg.errors.DeadlockDetected)
                else f"lock not granted within {settings.lock_timeout_seconds:.1f}s",
                attempt,
                settings.lock_retries,
            )
            sleep(delay * (1 + random.random()))  # noqa: S311 - jitter, not security
            delay *= 2


class BusyError(MatviewError):
    """Another session holds the view's lock: it is being applied or refreshed right now."""


#: The table, in each view's schema, that holds one row per view being applied, refreshed or deleted.
LOCK_TABLE = "matview_view_locks"


def lock_key(view: MaterializedView) -> str:
    """The view's row in the lock table: its quoted schema and name, so ``"a.b"."c"`` and ``"a"."b.c"``
    differ."""
    return sqltext.qualified_label(view.schema, view.name)


#: The lock and versions tables of a schema: trusted when the operator's role (or a superuser) owns them and
#: this role may use them; a look-alike made first by someone else is never written to.
_TRUSTED = sql.SQL("""c.relkind = 'r' AND (c.relowner = r.oid OR o.rolsuper)
       AND has_table_privilege(c.oid, 'SELECT, INSERT, UPDATE, DELETE')""")
_SCHEMA_TABLES_FROM = sql.SQL("""
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_roles o ON o.oid = c.relowner
JOIN pg_roles r ON r.rolname = current_user
WHERE n.nspname = %s AND c.relname = ANY(%s)""")
_SCHEMA_TABLES = sql.SQL("SELECT c.relname::text, {trusted}, o.rolname {source}").format(
    trusted=_TRUSTED, source=_SCHEMA_TABLES_FROM
)
#: The same check as one statement that fails (division by zero) unless both tables are there and trusted: sent
#: first in the lock's batch, it stops the take before it could write to a look-alike (a table's triggers and
#: rules run even for a write that changes no row), so the usual case costs no round trip of its own.
_BOTH_TRUSTED = sql.SQL("SELECT 1 / (count(*) FILTER (WHERE {trusted}) = 2)::int {source}").format(
    trusted=_TRUSTED, source=_SCHEMA_TABLES_FROM
)
_CREATE_LOCK_TABLE = sql.SQL(
    # UNLOGGED: a lock is only worth anything while its holder's session lives, which no crash survives.
    "CREATE UNLOGGED TABLE IF NOT EXISTS {} (relation text PRIMARY KEY, pid int NOT NULL, "
    "backend_start timestamptz NOT NULL, taken_at timestamptz NOT NULL DEFAULT clock_timestamp())"
)
_TAKE = sql.SQL("""
INSERT INTO {table} AS held (relation, pid, backend_start)
SELECT %(key)s, a.pid, a.backend_start FROM pg_stat_activity a WHERE a.pid = pg_backend_pid()
ON CONFLICT (relation) DO UPDATE SET pid = excluded.pid, backend_start = excluded.backend_start,
                                     taken_at = clock_timestamp()
WHERE NOT EXISTS (SELECT 1 FROM pg_stat_activity a
                  WHERE a.pid = held.pid AND (a.backend_start = held.backend_start OR a.backend_start IS NULL))
RETURNING 1
""")
_RELEASE = sql.SQL("DELETE FROM {} WHERE relation = %s AND pid = pg_backend_pid()")
_RELEASING = sql.SQL("WITH released AS ({release}) {read}")


def _lock_table(conn: Connection, view: MaterializedView) -> sql.Identifier | None:
    """The schema's lock table, created on first use with its data versions table (plan/versions.py); None
    when the schema does not exist (yet)."""
    names = [LOCK_TABLE, versions.VERSIONS_TABLE]
    for _ in range(2):
        found = {
            str(name): (bool(ok), str(owner)) for name, ok, owner in conn.execute(_SCHEMA_TABLES, (view.schema, names))
        }
        for name, (ok, owner) in sorted(found.items()):
            if not ok:
                raise UnmanagedObjectError(
                    f"{view.schema}.{name} is owned by role {owner!r}, which is neither this role nor a "
                    "superuser, or this role may not write it: no view in the schema can be refreshed until a DBA "
                    "drops it (the engine re-creates it) or grants this role SELECT, INSERT, UPDATE, DELETE on it"
                )
        if len(found) == len(names):
            return sql.Identifier(view.schema, LOCK_TABLE)
        try:
            with conn.transaction():
                conn.execute(_CREATE_LOCK_TABLE.format(sql.Identifier(view.schema, LOCK_TABLE)))
                for statement in versions.create_statements(view.schema):
                    conn.execute(statement)
        except psycopg.errors.InvalidSchemaName:
            return None
        except psycopg.errors.InsufficientPrivilege as exc:
            raise MatviewError(
                f"{view.relation}: the operator's role needs CREATE on schema {view.schema} for the views' lock "
                f"and version tables ({LOCK_TABLE}, {versions.VERSIONS_TABLE}; or a DBA creates them: see "
                "docs/operations.md, Locking)"
            ) from exc
        except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable, psycopg.errors.DuplicateObject):
            continue  # another process created them (or their row type) at the same moment
        except psycopg.errors.InternalError_ as exc:
            # Two sessions that each found the tables already made both GRANT on the same pg_class row.
            if exc.diag.message_primary != "tuple concurrently updated":
                raise
            continue
    return sql.Identifier(view.schema, LOCK_TABLE)


class HeldLock:
    """The view's lock while held: its release may ride on the refresh's last transaction (one statement
    fewer, and the lock goes exactly when the refresh's state is committed)."""

    def __init__(
        self,
        table: sql.Identifier | None,
        key: str,
        read_row: tuple[Any, ...] | None = None,
        also_row: tuple[Any, ...] | None = None,
    ) -> None:
        self._table = table
        self._key = key
        self.released = table is None
        self.read_row = read_row
        """The row of the read sent with the take (view_lock's ``then``), read under the lock."""
        self.also_row = also_row
        """The row of view_lock's ``also``, read under the lock after ``then``."""

    def releasing(self, read: Query) -> Query:
        """read, made to release the lock too when its transaction commits (a data-modifying WITH runs whether
        or not the read uses it: one statement instead of two); the caller marks the lock ``released`` once
        that transaction has committed. Only a read without a WITH of its own and positional parameters."""
        if self._table is None:
            return read
        statement, parameters = read
        assert parameters is None or isinstance(parameters, tuple), "positional parameters only"
        return _RELEASING.format(release=_RELEASE.format(self._table), read=statement), (self._key, *(parameters or ()))

    def release(self, conn: Connection) -> None:
        """Release it now (unless a committed transaction already did).

        A release that fails is tried once more, after rolling back what the failure left: a cancelled task's
        cancel request, sent while its thread was already finishing, is spent on the statement it lands on, which
        may be this DELETE (a pooled connection would then hold the view for as long as it lives: every refresh a
        busy skip). Failing twice, the session is ended instead: a holder whose session has ended holds nothing."""
        if self.released:
            return
        self.released = True
        if self._table is None:
            return
        for _ in range(2):
            try:
                conn.execute(_RELEASE.format(self._table), (self._key,))
                return
            except psycopg.Error:
                session.roll_back(conn)
        with contextlib.suppress(Exception):
            conn.close()


def _take(
    conn: Connection,
    view: MaterializedView,
    table: sql.Identifier | None,
    key: str,
    reads: tuple[Query | None, ...],
) -> tuple[psycopg.Cursor[Any] | None, list[psycopg.Cursor[Any] | None]]:
    """Send the tables' check, the lock's take and the reads in one batch (one implicit transaction: an error in
    any rolls the take back too); no table (the schema does not exist yet): only the reads. The cursors of the
    take and of each read."""
    if table is None:
        with conn.pipeline():
            return None, [conn.execute(*read) if read is not None else None for read in reads]
    with conn.pipeline():
        conn.execute(_BOTH_TRUSTED, (view.schema, [LOCK_TABLE, versions.VERSIONS_TABLE]))
        taken = conn.execute(_TAKE.format(table=table), {"key": key})
        cursors = [conn.execute(*read) if read is not None else None for read in reads]
    return taken, cursors


@contextlib.contextmanager
def view_lock(
    conn: Connection, view: MaterializedView, then: Query | None = None, also: Query | None = None
) -> Iterator[HeldLock]:
    """Hold the view's lock for a whole apply, delete or refresh, or raise BusyError at once.

    One lock for everything that changes a view, held across all of its steps (a Swap's build, swap and
    retire included), so a second process can never start between two steps of the first. It is a row in
    ``<schema>.matview_view_locks``, a table only the operator's role may write: a session advisory lock
    would need no privilege at all, so any database user (or a view's own query) could take another view's
    key and keep it busy for as long as it liked. The row names the holding backend (pid and start time); it
    is released at the end (or by the transaction that commits the holder's last step, see ``Closing``), and
    a holder whose session has ended, however it ended, holds nothing.

    ``then``, a read, goes to the server with the take in one batch and runs after it (so under the lock; its
    row is the held lock's ``read_row``, discarded when the view is busy): one round trip instead of two.
    ``also``, a second read, follows it the same way (``also_row``).
    """
    key = lock_key(view)
    table: sql.Identifier | None = sql.Identifier(view.schema, LOCK_TABLE)
    try:
        taken, reads = _take(conn, view, table, key, (then, also))
    except psycopg.errors.DivisionByZero:  # not there yet, or not ours: create them, or say whose they are
        table = _lock_table(conn, view)
        taken, reads = _take(conn, view, table, key, (then, also))  # checked again: whatever happened meanwhile
    if taken is not None and taken.fetchone() is None:
        raise BusyError(f"{view.relation}: another process is applying or refreshing this view right now")
    read_row, also_row = (read.fetchone() if read is not None else None for read in reads)
    held = HeldLock(table, key, read_row, also_row)
    try:
        yield held
    finally:
        held.release(conn)


@dataclass(frozen=True)
class Closing:
    """What ends a plan inside its last transaction instead of in transactions of its own: statements built
    once the plan's statements have run (they may record how long that took), then one read whose row is
    handed to ``on_commit`` once that transaction has committed. Run as the operator's role."""

    statements: Callable[[float], Sequence[Query]]
    """Given the seconds the plan's statements took: what to run before the read (the marker)."""
    read: Query
    on_commit: Callable[[tuple[Any, ...] | None], None]


def _add_item(message: session.Message, item: StepItem) -> None:
    """Queue item in message; a FromRows sends what is queued with its read, for the statements its rows decide."""
    if isinstance(item, FromRows):
        at = message.add(*item.query)
        rows = session.result_of(message.send(), at).fetchall()
        for statement in item.then(rows):
            message.add(statement)
    else:
        message.add(item)


def _run_item(conn: Connection, item: StepItem) -> None:
    if isinstance(item, FromRows):
        rows = conn.execute(*item.query).fetchall()  # in a pipeline, fetching syncs what was sent before
        for statement in item.then(rows):
            conn.execute(statement)
    else:
        conn.execute(item)


def _run_step(
    conn: Connection,
    step: Step,
    settings: ExecutionSettings,
    view: MaterializedView,
    closing: Closing | None = None,
    started: float = 0.0,
    live_after: float | None = None,
) -> None:
    """live_after: the seconds until an earlier step of the plan made the new data live, which is what the closing
    records when given; else the closing waits for this step's work to measure it."""
    if step.restricted_user_sql:
        session.step_starts(conn)
    else:
        session.exposed(conn)  # the user's SQL may run here as itself (a build, an index expression)
    if not step.transactional:
        session.step_settings(
            conn, view, settings.statement_timeout_seconds, settings.lock_timeout_seconds, local=False
        )
        try:
            for item in step.statements:
                _run_item(conn, item)
        finally:
            with contextlib.suppress(psycopg.Error):
                session.restore(conn)
        if closing is not None:  # CONCURRENTLY steps cannot share a transaction: the closing gets its own
            _run_step(conn, Step("record the result", ()), settings, view, closing, started, live_after)
        return
    # One message (a simple Query): BEGIN, the step's settings, its statements and COMMIT (a closing adds one, after
    # the step's work, for its duration; a FromRows read ends one where it stands). pg_stat_activity shows a
    # message's whole text while it runs: "BEGIN; SELECT pg_catalog.set_config(…); REFRESH …". An error stops the
    # message and rolls the transaction back.
    message = session.Message(conn)
    read_at = None
    try:
        session.start_transaction(conn, message)
        if step.repeatable_read:  # must come before the first query of the transaction
            message.add(sql.SQL("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        message.add(
            *session.step_settings_query(view, settings.statement_timeout_seconds, settings.lock_timeout_seconds, True)
        )
        if step.runs_query:
            session.exposed(conn)
            role = session.query_role_statement(view)
            if role is not None:
                message.add(role)
        for item in step.statements:
            _add_item(message, item)
        if closing is not None and live_after is None:
            message.send()  # the step's work is done: how long it took goes into the closing statements
        if closing is not None and step.runs_query:
            message.add(sql.SQL("RESET ROLE"))
        # After the step's statements, so it outlives them and the transaction: a query that set search_path
        # for the session (set_config(..., false) from a SELECT) must not leave it to the engine's next
        # statement; and before the closing, whose statements are the engine's own and must not resolve
        # names in spec.searchPath's schemas (a planted pg_table_size(oid) there would beat pg_catalog's).
        # A refresh's last transaction releases the advisory locks its query may have taken in the same statement
        # (the rest of the in-band cleanup follows the closing's statements).
        message.add(
            session.configure_statement(conn, release_advisory_locks=closing is not None and step.restricted_user_sql)
        )
        in_band_reset = None
        if closing is not None:
            seconds = live_after if live_after is not None else time.monotonic() - started
            for statement, parameters in closing.statements(seconds):
                message.add(statement, parameters)
            if step.restricted_user_sql:
                for statement in session.IN_BAND_CLEANUP:
                    message.add(statement)
            read_at = message.add(*closing.read)
            if not step.restricted_user_sql:  # the user's SQL may have run unrestricted: the whole reset, in band
                in_band_reset = session.reset_in_band(conn, message)
        message.add(session.COMMIT)
        sent = message.send()
    except BaseException:
        session.roll_back(conn)
        raise
    if closing is not None:
        assert read_at is not None  # queued with the closing
        read_row = session.result_of(sent, read_at).fetchone()
        if in_band_reset is not None:
            counts = session.result_of(sent, in_band_reset.position - read_at).fetchone()
            session.reset_in_band_committed(conn, in_band_reset, counts)
        elif step.restricted_user_sql:
            session.cleaned_in_band(conn)
        closing.on_commit(read_row)


def execute(
    conn: Connection,
    plan: Plan,
    settings: ExecutionSettings,
    closing: Closing | None = None,
    completed: Callable[[str], None] | None = None,
) -> list[str]:
    """Run every step in order; return the descriptions of the steps done. With a closing, the last step's
    transaction ends with it. Raises ApplyError on failure. ``completed`` is told what each step that
    ``completes`` something put in place, once it has committed (a failure of its own is only logged)."""
    done: list[str] = []
    started = time.monotonic()
    # A plan's duration runs until its new data went live: what follows (dropping a Swap's retired copy) is not
    # what the mode costs its readers, and its closing needs no round trip of its own to learn the duration.
    live_after: float | None = None
    for index, step in enumerate(plan.steps):
        logger.log(logging.INFO if plan.log_steps else logging.DEBUG, "%s: %s", plan.view.relation, step.description)
        last = closing if index == len(plan.steps) - 1 else None
        known = live_after if not step.makes_data_live else None
        try:
            if step.takes_exclusive_lock:
                run_with_lock_retries(
                    lambda step=step, last=last, known=known: _run_step(  # type: ignore[misc]
                        conn, step, settings, plan.view, last, started, known
                    ),
                    settings,
                    step.description,
                )
            else:
                _run_step(conn, step, settings, plan.view, last, started, known)
        except psycopg.Error as exc:
            for statement in step.cleanup:
                with contextlib.suppress(psycopg.Error):
                    conn.execute(statement)
            sqlstate = exc.sqlstate or "?"
            message = (exc.diag.message_primary or str(exc)).strip()
            message = sqltext.explain_unresolved(message, sqlstate, plan.view.search_path)
            raise ApplyError(
                f"{plan.view.relation}: step '{step.description}' failed [{sqlstate}]: {message}"
                + (f" (done before it: {'; '.join(done)})" if done else "")
            ) from exc
        done.append(step.description)
        if step.makes_data_live:
            live_after = time.monotonic() - started
        if completed is not None and step.completes is not None:
            try:
                completed(step.completes)
            except Exception:
                logger.exception("%s: reporting progress failed", plan.view.relation)
    return done
