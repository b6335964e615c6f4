"""Data versions and change signals, read by applications: an ETag per view, and events to invalidate caches.

Every refresh that makes new data live bumps the view's row in ``<schema>.matview_versions`` and sends one
NOTIFY on ``matview_changes``, in the same transaction (the engine's side is ``matview.plan.versions``).
``version`` reads the number (use it as an HTTP ETag: it changes exactly when the data may have);
``listen`` yields one ``Change`` per refresh, with the keys an incremental refresh recomputed when there
were few. A listener that lost its connection reconnects by itself and then yields a ``Change`` with
``gap=True``: notifications sent while it was away are lost, so everything may have changed.

This module is psycopg only, and its statements are written for a search_path where other roles may have
planted look-alikes (every function and operator is pg_catalog's, named so).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

logger = logging.getLogger(__name__)

#: Kept equal to matview.plan.versions (the client imports nothing of the operator; a test compares them).
VERSIONS_TABLE = "matview_versions"
CHANNEL = "matview_changes"

_VERSION = sql.SQL("SELECT v.version FROM {} AS v WHERE v.relation OPERATOR(pg_catalog.=) %s::pg_catalog.text")


def version(conn: psycopg.Connection[Any], relation: tuple[str, str]) -> int:
    """The view's data version: 0 before its first build (or where no refresh has recorded one yet)."""
    schema, name = relation
    try:
        with conn.transaction():  # a savepoint inside the application's transaction: an error stays in it
            row = conn.execute(
                _VERSION.format(sql.Identifier(schema, VERSIONS_TABLE)), (f"{schema}.{name}",)
            ).fetchone()
    except psycopg.errors.UndefinedTable:
        return 0
    return int(row[0]) if row else 0


@dataclass(frozen=True)
class Change:
    """One refresh of one view (or, with gap=True, "anything may have changed")."""

    relation: str | None
    """``schema.name``; None with gap=True (every view)."""
    version: int | None = None
    mode: str | None = None
    keys_changed: int | None = None
    """How many keys an incremental refresh recomputed (None for a full refresh: all of them)."""
    keys: tuple[tuple[Any, ...], ...] | None = None
    """The keys, when few enough to send; None means every key may have changed."""
    gap: bool = False
    """The listener reconnected: changes may have been missed; drop every cached entry."""


def parse(payload: str) -> Change | None:
    """A Change from a notification's payload (None for one that is not ours)."""
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("relation"), str):
        return None
    keys = data.get("keys")
    return Change(
        relation=data["relation"],
        version=data.get("version") if isinstance(data.get("version"), int) else None,
        mode=data.get("mode") if isinstance(data.get("mode"), str) else None,
        keys_changed=data.get("keysChanged") if isinstance(data.get("keysChanged"), int) else None,
        keys=tuple(tuple(k) if isinstance(k, list) else (k,) for k in keys) if isinstance(keys, list) else None,
    )


def listen(
    dsn: str,
    relations: Iterable[str] | None = None,
    stop: Callable[[], bool] = lambda: False,
    poll_seconds: float = 1.0,
    reconnect_seconds: float = 1.0,
    connect: Callable[[str], psycopg.Connection[Any]] | None = None,
    on_listening: Callable[[], None] = lambda: None,
) -> Iterator[Change]:
    """Yield a Change for every refresh of the views named (``schema.name``; all views when None), until
    stop() says so. Reconnects by itself (waiting ``reconnect_seconds``, doubling to a minute) and yields a
    ``gap`` Change after every reconnection. on_listening is called each time the listener is (again)
    listening: a cache filled after that misses no change."""
    wanted = set(relations) if relations is not None else None
    opener = connect or (lambda target: psycopg.connect(target, autocommit=True))
    delay = reconnect_seconds
    connected_before = False
    while not stop():
        try:
            with opener(dsn) as conn:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
                on_listening()
                if connected_before:
                    yield Change(relation=None, gap=True)
                connected_before, delay = True, reconnect_seconds
                while not stop():
                    for notification in conn.notifies(timeout=poll_seconds, stop_after=1):
                        change = parse(notification.payload)
                        if change is not None and (wanted is None or change.relation in wanted):
                            yield change
        except psycopg.OperationalError as exc:
            logger.warning("change listener: %s; reconnecting in %.1fs", str(exc).strip(), delay)
            connected_before = True  # whatever was sent while away is lost
            end = time.monotonic() + delay
            while time.monotonic() < end and not stop():
                time.sleep(min(0.1, delay))
            delay = min(delay * 2, 60.0)
