"""A small HTTP endpoint serving the driver-matrix view: keyset pages, ETag/304, a per-key cache.

The write-up this project comes from served its reporting view through an API; this is that API on top of
``matview.client``, with the standard library only (http.server, threading, json) besides psycopg:

- ``GET /drivers?limit=50&after=CURSOR`` — a keyset page of the stored table, with ``ETag`` = the view's
  data version; ``If-None-Match`` with the current one answers ``304 Not Modified``.
- ``GET /drivers?source=live`` — the same from the live view, fresh to the last commit (no ETag: it
  changes with every write, not with refreshes).
- ``GET /drivers/<id>`` — one driver's rows from an in-process cache (``X-Cache: hit|miss``); a listener
  thread drops exactly the keys each incremental refresh recomputed (everything after a full refresh or a
  reconnection). ``?source=live`` reads the live view, uncached.

Run it next to a database where ``examples/driver-matrix-incremental.yaml`` is applied::

    python examples/app/driver_matrix_api.py "$DATABASE_URL" 8080
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import psycopg
from psycopg import sql

from matview import client

STORED = ("ops", "driver_matrix_inc")
LIVE = ("ops", "driver_matrix_inc_live")


class DriverMatrixAPI:
    """The endpoint's state: a connection per request, the cache, and the listener that invalidates it."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.cache: dict[int, list[dict[str, Any]]] = {}
        self.lock = threading.Lock()
        self.listening = threading.Event()
        self.stopped = threading.Event()
        self.invalidations = 0

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            yield conn

    def listen(self) -> None:
        """Drop the cached drivers each refresh recomputed (all of them when it does not say which)."""
        relation = ".".join(STORED)
        for change in client.listen(
            self.dsn, [relation], stop=self.stopped.is_set, poll_seconds=0.2, on_listening=self.listening.set
        ):
            with self.lock:
                if change.gap or change.keys is None:
                    self.cache.clear()
                else:
                    for key in change.keys:
                        self.cache.pop(int(key[0]), None)
                self.invalidations += 1

    def driver(self, driver_id: int, live: bool) -> tuple[list[dict[str, Any]], bool]:
        """(the driver's rows, whether they came from the cache)."""
        if not live:
            with self.lock:
                if driver_id in self.cache:
                    return self.cache[driver_id], True
        with self.connection() as conn:
            cur = conn.execute(
                sql.SQL("SELECT * FROM {} WHERE driver_id = %s").format(sql.Identifier(*(LIVE if live else STORED))),
                (driver_id,),
            )
            names = [d.name for d in cur.description or ()]
            rows = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        if not live:
            with self.lock:
                self.cache[driver_id] = rows
        return rows, False


def _json(value: Any) -> Any:
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)


def handler(api: DriverMatrixAPI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def send(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
            data = b"" if body is None else json.dumps(body, default=_json).encode()
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if body is not None:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            live = query.get("source") == "live"
            try:
                if url.path == "/drivers":
                    self.page(query, live)
                elif url.path.startswith("/drivers/"):
                    rows, hit = api.driver(int(url.path.rsplit("/", 1)[1]), live)
                    self.send(200 if rows else 404, rows, {"X-Cache": "hit" if hit else "miss"})
                else:
                    self.send(404, {"error": "not found"})
            except (client.CursorError, client.OrderError, ValueError) as exc:
                self.send(400, {"error": str(exc)})

        def page(self, query: dict[str, str], live: bool) -> None:
            with api.connection() as conn:
                etag = f'"{client.version(conn, STORED)}"'
                if not live and self.headers.get("If-None-Match") == etag:
                    self.send(304, None, {"ETag": etag})
                    return
                found = client.page(
                    conn,
                    LIVE if live else STORED,
                    order=["driver_id"],
                    limit=int(query.get("limit", "50")),
                    after=query.get("after"),
                    before=query.get("before"),
                )
            body = {
                "rows": [dict(zip(found.columns, row, strict=True)) for row in found.rows],
                "next": found.next,
                "previous": found.previous,
            }
            self.send(200, body, {} if live else {"ETag": etag})

    return Handler


def serve(dsn: str, port: int = 0) -> tuple[ThreadingHTTPServer, DriverMatrixAPI]:
    """Start the endpoint and its listener in threads; returns the server (``server_address`` has the port)."""
    api = DriverMatrixAPI(dsn)
    threading.Thread(target=api.listen, daemon=True).start()
    server = ThreadingHTTPServer(("127.0.0.1", port), handler(api))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, api


if __name__ == "__main__":
    running, _ = serve(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8080)
    print(f"serving on http://127.0.0.1:{running.server_address[1]}/drivers", flush=True)
    threading.Event().wait()
