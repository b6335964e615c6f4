"""Small builders for test documents, and the CLI run on one file."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg import pq

from matview.api.spec import MaterializedView
from matview.api.validation import validate_document


def document(resource: str = "totals", namespace: str = "ops", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"query": "SELECT 1 AS one"}
    body.update(spec)
    return {
        "apiVersion": "matview.dev/v1alpha1",
        "kind": "MaterializedView",
        "metadata": {"name": resource, "namespace": namespace},
        "spec": copy.deepcopy(body),
    }


def view(resource: str = "totals", namespace: str = "ops", **spec: Any) -> MaterializedView:
    return validate_document(document(resource, namespace, **spec))


def to_yaml(doc: dict[str, Any]) -> str:
    return yaml.safe_dump(doc, sort_keys=False)


def cli_on(file: str, dsn: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``matview <command> [args] FILE --dsn DSN`` as a process, for one file: call it with the command."""

    def matview(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "matview.cli", *args, file, "--dsn", dsn],
            capture_output=True,
            text=True,
            check=False,
        )

    return matview


class RoundTrips:
    """Counts the round trips a connection makes, from libpq's trace of the messages it sends: each Sync (the
    end of a batch, or of a statement outside a pipeline), each simple Query, and each Flush that does not
    follow a Sync (a fetch inside a pipeline asks for the results so far without ending the batch)."""

    def __init__(self, conn: psycopg.Connection[Any], path: Path) -> None:
        self._conn, self._path = conn, path

    def __enter__(self) -> RoundTrips:
        self._file = self._path.open("w")
        self._conn.pgconn.trace(self._file.fileno())
        self._conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
        return self

    def __exit__(self, *_: object) -> None:
        self._conn.pgconn.untrace()
        self._file.close()

    def count(self) -> int:
        sent = [
            fields[2].strip() for line in self._path.read_text().splitlines() if (fields := line.split("\t"))[0] == "F"
        ]
        return sum(
            1
            for position, message in enumerate(sent)
            if message in ("Sync", "Query") or (message == "Flush" and (position == 0 or sent[position - 1] != "Sync"))
        )
