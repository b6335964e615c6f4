"""The packages form layers: each imports only from the layers it is allowed to (shared/design.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "operator" / "matview"
SHARED = {"comparisons", "constants", "errors", "lru", "outcomes", "timestamps"}
#: What each place may import from matview, besides the shared vocabulary above and itself.
ALLOWED = {
    "api": set(),
    "plan": {"api"},
    "refresh": {"api", "plan", "observe"},
    "observe": {"api"},
    "k8s": {"api", "plan", "refresh", "observe"},
    "embedded": set(),
    "client": set(),  # for applications: psycopg only (test_the_client_loads_psycopg_and_nothing_of_the_operator)
}


def imported_places(file: Path) -> set[str]:
    places = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("matview."):
            places.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "matview":
            places.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            places.update(a.name.split(".")[1] for a in node.names if a.name.startswith("matview."))
    return places


@pytest.mark.parametrize("place", sorted(ALLOWED))
def test_a_place_imports_only_from_the_layers_it_may(place: str) -> None:
    for file in sorted((PACKAGE / place).rglob("*.py")):
        wrong = imported_places(file) - ALLOWED[place] - SHARED - {place}
        assert not wrong, f"{file.relative_to(PACKAGE)} imports {sorted(wrong)}"


def test_the_operator_needs_neither_the_demo_nor_the_embedded_server() -> None:
    for place in ("k8s", "refresh", "plan", "api", "observe"):
        for file in (PACKAGE / place).rglob("*.py"):
            assert not imported_places(file) & {"demo", "embedded", "cli"}, file


def test_the_client_loads_psycopg_and_nothing_of_the_operator() -> None:
    """What an application gets with ``from matview import client``: no kopf, no Kubernetes client, no
    pglast, no YAML, no Prometheus client, no engine: of matview, only the client and the comparisons it shares
    with the engine (psycopg only)."""
    import subprocess
    import sys

    probe = (
        "import sys; from matview import client; "
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('kopf', 'kubernetes', 'pglast', 'yaml', 'prometheus_client', 'psycopg_pool', 'cronsim') "
        "or (m.startswith('matview.') and not m.startswith(('matview.client', 'matview.comparisons'))))))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "", done.stdout
