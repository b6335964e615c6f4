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

import psycopg
from psycopg import sql

from matview.api import sqltext
from matview.api.spec import MaterializedView
from matview.constants import APPLICATION_NAME
from matview.plan.observed import Connection

#: The session's search_path for every statement the engine sends itself.
ENGINE_SEARCH_PATH = "pg_catalog, pg_temp"

_PIN = sql.SQL("SELECT pg_catalog.set_config('search_path', %s, false)")


def configure(conn: Connection) -> None:
    """Pin the session's search_path (a new connection, or after a reset or the user's query)."""
    conn.execute(_PIN, (ENGINE_SEARCH_PATH,))


def reset(conn: Connection) -> None:
    """Return a pooled connection to a clean session before anyone else uses it.

    The user's query runs on these connections and can change session state from a SELECT:
    ``pg_advisory_lock`` (which would make another view look busy forever), ``set_config`` of any
    parameter, a role. DISCARD ALL releases and resets all of it (psycopg drops its prepared statements
    with it), which also resets search_path to the server's default: so it is pinned again. A connection
    that cannot be reset is discarded by the pool."""
    conn.execute(sql.SQL("DISCARD ALL"))
    configure(conn)


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
    conn.execute(
        sql.SQL("SELECT set_config('search_path', %s, %s)"), (sqltext.pinned_search_path(view.search_path), local)
    )


def become_query_role(conn: Connection, view: MaterializedView) -> None:
    """Inside a transaction: act as spec.runAsRole until it ends (nothing when the spec names none)."""
    if view.run_as_role is not None:
        conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(view.run_as_role)))
