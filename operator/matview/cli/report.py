"""How a verb prints its results and problems (human or --json) and chooses its exit code, importable
without the engine: ``matview refresh`` prints what a running ``matview run`` did exactly as what it did
itself."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from matview.outcomes import Outcome

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


def finish(
    as_json: bool,
    results: Sequence[dict[str, Any]],
    problems: Sequence[dict[str, Any]],
    human: Callable[[dict[str, Any]], str],
) -> int:
    """Print results and problems; exit 2 when anything was invalid, 1 when anything failed."""
    if as_json:
        print(json.dumps([*results, *problems], indent=2))
    else:
        for result in results:
            print(human(result))
        for problem in problems:
            where = problem["file"] + (f" ({problem['resource']})" if problem["resource"] else "")
            error = problem["error"]
            if error["kind"] == "invalid":
                print(f"invalid: {where}:", file=sys.stderr)
                for item in error["problems"]:
                    print(f"  {item['field']}: {item['message']}", file=sys.stderr)
            else:
                print(f"error: {where}: {error['message']}", file=sys.stderr)
    kinds = {problem["error"]["kind"] for problem in problems}
    return EXIT_INVALID if "invalid" in kinds else EXIT_FAILED if kinds else EXIT_OK


def refresh_line(r: dict[str, Any]) -> str:
    """One refresh as ``matview refresh`` prints it."""
    line = f"{r['relation']}: {r['result']} ({r['mode']}, {r['durationSeconds']:.3f}s"
    line += f", {r['rows']} rows)" if r["rows"] is not None else ")"
    line += f"\n  why: {r['reason']}"
    if r["message"]:
        line += f"\n  {r['failureReason'] or 'note'}: {r['message']}"
    if r.get("refreshedBy"):
        line += f"\n  by: {r['refreshedBy']}"
    return line


def refresh_exit(code: int, results: Sequence[dict[str, Any]]) -> int:
    """A refresh that failed exits 1, unless a problem already chose the code."""
    return code or (EXIT_FAILED if any(r["result"] == Outcome.FAILURE for r in results) else EXIT_OK)
