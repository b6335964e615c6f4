"""What every verb shares: where the database is, what applies may accept, the batch of views a command
works through, and its output (human or --json) and exit code, in one place."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matview.api.spec import MaterializedView
from matview.api.validation import load_file
from matview.cli import report
from matview.cli.arguments import DEFAULT_EMBEDDED_DIR, read_dsn_file
from matview.cli.report import EXIT_FAILED, EXIT_INVALID, EXIT_OK
from matview.errors import MatviewError, SpecError
from matview.plan import engine

__all__ = ["DEFAULT_EMBEDDED_DIR", "EXIT_FAILED", "EXIT_INVALID", "EXIT_OK", "Batch", "database_url", "policy"]


def database_url(args: argparse.Namespace) -> str:
    if args.dsn:
        return str(args.dsn)
    if getattr(args, "dsn_file", None):
        return read_dsn_file(Path(args.dsn_file))
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    from matview.embedded.localpg import ensure_embedded

    dsn = ensure_embedded(Path(args.embedded_dir))
    print(
        f"using the embedded PostgreSQL in {args.embedded_dir} ({dsn}); stop it with 'matview embedded-stop'",
        file=sys.stderr,
    )
    return dsn


def policy(args: argparse.Namespace) -> engine.ApplyPolicy:
    return engine.ApplyPolicy(allow_superuser_run_as_role=bool(getattr(args, "allow_superuser_run_as_role", False)))


class Batch:
    """The views of every file named, and the problems found so far; commands go on past a bad file or view."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.views: list[tuple[MaterializedView, str]] = []
        self.problems: list[dict[str, Any]] = []
        for path in paths:
            try:
                self.views += [(view, str(path)) for view in load_file(path)]
            except SpecError as exc:
                self.invalid(exc, str(path), None)

    def invalid(self, error: SpecError, file: str, view: MaterializedView | None) -> None:
        self.problems.append(
            {
                "file": file,
                "resource": view.owner if view else None,
                "error": {
                    "kind": "invalid",
                    "message": str(error),
                    "problems": [{"field": e.path, "message": e.message} for e in error.errors],
                },
            }
        )

    def failed(self, error: BaseException, file: str, view: MaterializedView) -> None:
        self.problems.append(
            {"file": file, "resource": view.owner, "error": {"kind": "failed", "message": str(error).strip()}}
        )

    def run(self, view: MaterializedView, file: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """work() for one view; a refusal or failure is recorded with its file and resource, not raised."""
        import psycopg

        try:
            return work()
        except SpecError as exc:
            self.invalid(exc, file, view)
        except (MatviewError, psycopg.Error) as exc:
            self.failed(exc, file, view)
        return None

    def finish(
        self, args: argparse.Namespace, results: list[dict[str, Any]], human: Callable[[dict[str, Any]], str]
    ) -> int:
        """Print results and problems; exit 2 when anything was invalid, 1 when anything failed."""
        return report.finish(args.json, results, self.problems, human)


def jsonable(value: Any) -> Any:
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)
