"""One door for text into SQL: ``sqltext.embed`` is the only place where non-constant text becomes SQL.

Everywhere else ``sql.SQL(...)`` takes a string literal (or a choice between two literals); names go in as
``sql.Identifier``, values as ``sql.Literal`` or parameters, and words read from the spec or the catalog
(index methods, privileges, view options) as prebuilt constants looked up in a table. This test walks the
package's source and fails on any other ``sql.SQL`` call, naming file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "operator" / "matview"
#: The audited function: its argument is a CheckedSQL that pglast parsed and printed.
DOOR = ("api/sqltext.py", "embed")


def _literal(node: ast.expr | None) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.IfExp):
        return _literal(node.body) and _literal(node.orelse)
    return False


def _calls_outside_the_door() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        tree = ast.parse(path.read_text(), filename=relative)
        functions = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "SQL"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "sql"
            ):
                continue
            if len(node.args) == 1 and not node.keywords and _literal(node.args[0]):
                continue
            inside = [f.name for f in functions if f.lineno <= node.lineno <= (f.end_lineno or f.lineno)]
            if (relative, inside[-1] if inside else "") == DOOR:
                continue
            found.append(f"{relative}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_only_the_audited_function_turns_text_into_sql() -> None:
    offenders = _calls_outside_the_door()
    assert offenders == [], "sql.SQL() of non-literal text outside sqltext.embed:\n" + "\n".join(offenders)


def test_the_walk_finds_what_it_must_refuse(tmp_path: Path) -> None:
    """The check itself: a call on a variable is found, literals and literal choices are not."""
    tree = ast.parse("sql.SQL(text)\nsql.SQL('a')\nsql.SQL('a' if x else 'b')\nsql.SQL(f'{x}')\n")
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert [_literal(call.args[0]) for call in calls] == [False, True, True, False]
