"""Execute: run a plan's steps with the safety settings every step needs.

Transactional steps run in one transaction each; CONCURRENTLY steps run in
autocommit, as PostgreSQL requires. Every step gets ``statement_timeout``;
steps that wait for an ACCESS EXCLUSIVE lock get ``lock_timeout`` and are
retried with backoff, because while such a lock request waits every new reader
queues behind it — a short timeout and a retry never cause an outage.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg
from psycopg import sql

from matview.api import sqltext
from matview.api.spec import MaterializedView, RefreshSpec
from matview.errors import ApplyError, MatviewError
from matview.plan import session
from matview.plan.catalog import Connection, become_query_role, pin_name_resolution
from matview.plan.planner import Plan, Step

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


def set_timeouts(conn: Connection, statement_seconds: float, lock_seconds: float, local: bool) -> None:
    """Apply timeouts as parameters (set_config), transaction-local or for the session."""
    conn.execute(
        sql.SQL("SELECT set_config('statement_timeout', %s, %s), set_config('lock_timeout', %s, %s)"),
        (f"{int(statement_seconds * 1000)}ms", local, f"{int(lock_seconds * 1000)}ms", local),
    )


def run_with_lock_retries(
    operation: Callable[[], None], settings: ExecutionSettings, what: str, sleep: Callable[[float], None] = time.sleep
) -> None:
    """Run operation; when it fails for a lock timeout, wait and try again a bounded number of times."""
    delay = settings.backoff_seconds
    for attempt in range(1, settings.lock_retries + 1):
        try:
            operation()
            return
        except psycopg.errors.LockNotAvailable:
            if attempt == settings.lock_retries:
                raise
            logger.info(
                "%s: lock not granted within %.1fs (attempt %d/%d); retrying",
                what,
                settings.lock_timeout_seconds,
                attempt,
                settings.lock_retries,
            )
            sleep(delay * (1 + random.random()))  # noqa: S311 - jitter, not security
            delay *= 2


class BusyError(MatviewError):
    """Another session holds the view's lock: it is being applied or refreshed right now."""


#: How often the server checks that the client of a long statement is still there (PostgreSQL 14+): when
#: a process is killed mid-refresh, its build stops within seconds instead of running to statement_timeout
#: while holding the view's lock.
CLIENT_CHECK_INTERVAL = "2s"


def lock_key(view: MaterializedView) -> int:
    """The view's 64-bit advisory-lock key: 64 bits of SHA-256 over the quoted schema and name, so
    ``"a.b"."c"`` and ``"a"."b.c"`` differ and an accidental collision between views is negligible."""
    quoted = ".".join('"' + part.replace('"', '""') + '"' for part in (view.schema, view.name))
    digest = hashlib.sha256((LOCK_KEY_NAMESPACE + quoted).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


#: Hashed into every lock key, so our keys are ours.
LOCK_KEY_NAMESPACE = "matview.dev/relation-lock:"


@contextlib.contextmanager
def view_lock(conn: Connection, view: MaterializedView) -> Iterator[None]:
    """Hold the view's session advisory lock for a whole apply, delete or refresh, or raise BusyError at once.

    One lock for everything that changes a view, held across all of its steps (a Swap's build, swap and
    retire included), so a second process can never start between two steps of the first. It is a
    session lock, so PgBouncer must run in session mode; pooled sessions are reset (DISCARD ALL) when
    they return to the pool, which also releases it should a crash skip the unlock.
    """
    key = lock_key(view)
    row = conn.execute(sql.SQL("SELECT pg_try_advisory_lock(%s::bigint)"), (key,)).fetchone()
    if not row or not row[0]:
        raise BusyError(f"{view.relation}: another process is applying or refreshing this view right now")
    try:
        with contextlib.suppress(psycopg.Error), conn.transaction():  # PostgreSQL 13 and older lack it
            conn.execute(
                sql.SQL("SELECT set_config('client_connection_check_interval', %s, false)"),
                (CLIENT_CHECK_INTERVAL,),
            )
        yield
    finally:
        with contextlib.suppress(psycopg.Error):
            conn.execute(sql.SQL("SELECT pg_advisory_unlock(%s::bigint)"), (key,))


def _run_step(conn: Connection, step: Step, settings: ExecutionSettings, view: MaterializedView) -> None:
    if step.transactional:
        with conn.transaction():
            if step.repeatable_read:  # must come before the first query of the transaction
                conn.execute(sql.SQL("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
            set_timeouts(conn, settings.statement_timeout_seconds, settings.lock_timeout_seconds, local=True)
            pin_name_resolution(conn, view, local=True)
            if step.runs_query:
                become_query_role(conn, view)
            for statement in step.statements:
                conn.execute(statement)
            # Last in the transaction, so it outlives it: a query that set search_path for the session
            # (set_config(..., false) from a SELECT) must not leave it to the engine's next statement.
            session.configure(conn)
    else:
        set_timeouts(conn, settings.statement_timeout_seconds, settings.lock_timeout_seconds, local=False)
        pin_name_resolution(conn, view, local=False)
        try:
            for statement in step.statements:
                conn.execute(statement)
        finally:
            with contextlib.suppress(psycopg.Error):
                conn.execute(sql.SQL("RESET statement_timeout; RESET lock_timeout"))
                session.configure(conn)


def execute(conn: Connection, plan: Plan, settings: ExecutionSettings) -> list[str]:
    """Run every step in order; return the descriptions of the steps done. Raises ApplyError on failure."""
    done: list[str] = []
    for step in plan.steps:
        logger.info("%s: %s", plan.view.relation, step.description)
        try:
            if step.takes_exclusive_lock:
                run_with_lock_retries(
                    lambda step=step: _run_step(conn, step, settings, plan.view),  # type: ignore[misc]
                    settings,
                    step.description,
                )
            else:
                _run_step(conn, step, settings, plan.view)
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
    return done
