"""Which relation should an application read: the materialized view, or the plain view behind it?

The hand-made fix this project grew from had its API read the materialized view when it existed and
fall back to the slow plain view otherwise. ``RelationChooser`` does that for any application: the MV
only when it exists *and is populated* (an unpopulated MV raises on SELECT; a table of storage Table
always is), cached briefly so that
the check costs one catalog lookup per ``cache_seconds`` rather than per request.

    chooser = RelationChooser(("ops", "mv_payments_driver_matrix_cabinet"),
                              ("ops", "v_payments_driver_matrix_cabinet"))
    relation = chooser.relation(conn)          # a psycopg.sql.Identifier
    conn.execute(sql.SQL("SELECT * FROM {} WHERE origin_tag = %s LIMIT 25").format(relation), (tag,))
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psycopg
from psycopg import sql

#: Runs under the application's search_path: every name qualified, every comparison pg_catalog's.
_POPULATED = sql.SQL(
    "SELECT c.relispopulated FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n "
    "ON n.oid OPERATOR(pg_catalog.=) c.relnamespace "
    "WHERE n.nspname OPERATOR(pg_catalog.=) %s::pg_catalog.name "
    "AND c.relname OPERATOR(pg_catalog.=) %s::pg_catalog.name "
    "AND c.relkind OPERATOR(pg_catalog.=) ANY ('{m,r}'::pg_catalog.\"char\"[])"
)


class RelationChooser:
    """Picks the materialized view when it can be read, else the fallback view; caches the answer."""

    def __init__(
        self,
        materialized: tuple[str, str],
        fallback: tuple[str, str],
        cache_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.materialized = materialized
        self.fallback = fallback
        self.cache_seconds = cache_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._answer: tuple[str, str] | None = None
        self._checked_at = float("-inf")

    def name(self, conn: psycopg.Connection[tuple[object, ...]]) -> tuple[str, str]:
        """(schema, name) to read from."""
        with self._lock:
            if self._answer is not None and self._clock() - self._checked_at < self.cache_seconds:
                return self._answer
        row = conn.execute(_POPULATED, self.materialized).fetchone()
        answer = self.materialized if row is not None and row[0] else self.fallback
        with self._lock:
            self._answer, self._checked_at = answer, self._clock()
        return answer

    def relation(self, conn: psycopg.Connection[tuple[object, ...]]) -> sql.Identifier:
        """The relation to read, ready to compose into a query."""
        return sql.Identifier(*self.name(conn))

    def forget(self) -> None:
        """Drop the cached answer (e.g. after a query on the MV failed)."""
        with self._lock:
            self._answer = None
