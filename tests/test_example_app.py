"""examples/app/driver_matrix_api.py against the real server: keyset pages with ETag/304, a write seen at once
through the live view and after one refresh through the stored table, and a per-key cache that the
change signal invalidates key by key."""

from __future__ import annotations

import importlib.util
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from matview.api.validation import load_file
from matview.plan import engine
from matview.plan.observed import Connection
from matview.refresh import record_build, refresh

ROOT = Path(__file__).resolve().parents[1]


def load_app() -> ModuleType:
    spec = importlib.util.spec_from_file_location("driver_matrix_api", ROOT / "examples/app/driver_matrix_api.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wait_for(condition: Callable[[], Any], what: str, seconds: float = 30) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        found = condition()
        if found:
            return found
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


class Http:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
        request = urllib.request.Request(self.base + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body = response.read()
                return response.status, dict(response.headers), json.loads(body) if body else None
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), None


@pytest.fixture
def app(conn: Connection, dsn: str) -> Iterator[tuple[Http, Any, Connection]]:
    conn.execute((ROOT / "sql/examples/driver_matrix/schema.sql").read_text())
    conn.execute("SELECT ops.load_driver_matrix(200)")
    [mv] = load_file(ROOT / "examples/driver-matrix-incremental.yaml")
    engine.apply(conn, mv)
    record_build(conn, mv)
    module = load_app()
    server, api = module.serve(dsn)
    wait_for(api.listening.is_set, "the listener")
    try:
        yield Http(server.server_address[1]), (api, mv), conn
    finally:
        api.stopped.set()
        server.shutdown()


def names(rows: list[dict[str, Any]]) -> list[Any]:
    return [row["driver_name"] for row in rows]


def test_the_example_app_serves_pages_etags_the_live_view_and_a_cache_invalidated_per_key(
    app: tuple[Http, Any, Connection],
) -> None:
    http, (api, mv), conn = app
    status, headers, first = http.get("/drivers?limit=5")
    assert status == 200 and len(first["rows"]) == 5 and first["next"]
    etag = headers["ETag"]
    assert http.get("/drivers?limit=5", {"If-None-Match": etag})[0] == 304
    status, _, second = http.get(f"/drivers?limit=5&after={first['next']}")
    assert [r["driver_id"] for r in second["rows"]] > [r["driver_id"] for r in first["rows"]]

    driver, other = first["rows"][1]["driver_id"], first["rows"][3]["driver_id"]
    status, headers, before = http.get(f"/drivers/{driver}")
    assert status == 200 and headers["X-Cache"] == "miss"
    assert http.get(f"/drivers/{driver}")[1]["X-Cache"] == "hit"
    assert http.get(f"/drivers/{other}")[1]["X-Cache"] == "miss"

    conn.execute("UPDATE public.drivers SET driver_name = 'Renamed' WHERE driver_id = %s", (driver,))
    _, _, live = http.get(f"/drivers/{driver}?source=live")
    assert names(live) != names(before), "the live view serves the write at once"
    _, headers, cached = http.get(f"/drivers/{driver}")
    assert headers["X-Cache"] == "hit" and names(cached) == names(before), "stored: as of the last refresh"

    seen = api.invalidations
    result = refresh(conn, mv, force=True)  # targetLag 1m would wait: refresh now
    assert result.mode == "Incremental" and result.keys_applied == 1, result
    wait_for(lambda: api.invalidations > seen, "the change signal")
    _, headers, fresh = http.get(f"/drivers/{driver}")
    assert headers["X-Cache"] == "miss" and names(fresh) == names(live), "the stored table after a refresh"
    assert http.get(f"/drivers/{other}")[1]["X-Cache"] == "hit", "an untouched key's entry survives the refresh"
    status, headers, _ = http.get("/drivers?limit=5", {"If-None-Match": etag})
    assert status == 200 and headers["ETag"] != etag
