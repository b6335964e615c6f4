"""Small builders for test documents, and the CLI run on one file."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import yaml

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
