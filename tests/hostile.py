"""The hostile database every database test runs in (issue #19).

Before any test, a role that may CREATE in ``public`` (``matview_hostile``) plants, in ``template1`` (so
every test database is born with them), look-alikes of every function and operator the engine's own SQL
calls, typed to beat ``pg_catalog``'s under a search_path that has ``public`` on it: ``text`` for ``name``
(a string literal prefers it), ``oid`` for ``regclass``, concrete arrays for ``anyarray``, ``varchar`` for
``text``. Each forwards to the real one, so a test's own statements still get right answers, and when it
runs in a session of the engine (application_name ``matview-operator``) it logs a WARNING the ``dsn``
fixture looks for after every test: a line there fails the test that caused it.

The list is built from the statements themselves, not by hand: every ``sql.SQL("…")`` literal under
``operator/matview`` is the text of an engine statement (user SQL enters only through ``sqltext``), and
every name followed by ``(`` there that is a function in ``pg_catalog`` is shadowed, as is every operator
symbol that appears in them.
"""

from __future__ import annotations

import ast
import itertools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from matview.constants import APPLICATION_NAME

ROLE = "matview_hostile"
MARK = "matview-shadow-called:"
SOURCE = Path(__file__).resolve().parents[1] / "operator" / "matview"

_NAME_CALL = re.compile(r"\b([a-z_][a-z0-9_]*)\s*\(")
_OPERATOR_SYMBOLS = ("=", "<>", "<", ">", "<=", ">=", "||", "~~", "@>", "&&")

#: pg_catalog type → the look-alike types that beat it for what the engine passes.
_BETTER = {
    "name": ["text"],
    "regclass": ["oid"],
    "regproc": ["oid"],
    "regprocedure": ["oid"],
    "regtype": ["oid"],
    "regnamespace": ["oid"],
    "regrole": ["oid"],
    "text": ["character varying"],
    "bigint": ["integer"],
    '"any"': ["text", "integer"],
}
_ELEMENTS = ["integer", "oid", "text", "bigint"]
_POLYMORPHIC_ELEMENT = {"anyelement", "anycompatible", "anynonarray", "anycompatiblenonarray"}
_POLYMORPHIC_ARRAY = {"anyarray", "anycompatiblearray"}
_UNUSABLE = {
    "internal",
    "cstring",
    "record",
    "anyrange",
    "anymultirange",
    "anycompatiblerange",
    "anyenum",
    "trigger",
    "event_trigger",
    "language_handler",
    "fdw_handler",
    "table_am_handler",
    "index_am_handler",
    "tsm_handler",
    "anycompatiblemultirange",
    "pg_ddl_command",
    "void",
    "unknown",
}


def engine_sql_literals() -> Iterator[str]:
    """The text of every ``sql.SQL("…")`` literal in the engine's source."""
    for path in sorted(SOURCE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "SQL"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                yield node.args[0].value


def called_names() -> set[str]:
    names: set[str] = set()
    for text in engine_sql_literals():
        names.update(match.lower() for match in _NAME_CALL.findall(text))
    return names


def used_operators() -> set[str]:
    found = set()
    for text in engine_sql_literals():
        for symbol in _OPERATOR_SYMBOLS:
            if re.search(rf"(?<![<>=!~@&|]){re.escape(symbol)}(?![<>=~@&|])", text):
                found.add(symbol)
        if re.search(r"\bLIKE\b", text):
            found.add("~~")
    return found


def _variants(argtypes: list[str]) -> Iterator[tuple[list[str], str | None]]:
    """Look-alike argument lists, each with the concrete element type chosen for polymorphic ones."""
    polymorphic = any(t in _POLYMORPHIC_ELEMENT | _POLYMORPHIC_ARRAY for t in argtypes)
    for element in _ELEMENTS if polymorphic else [None]:

        def concrete(t: str, element: str | None = element) -> list[str]:
            if t in _POLYMORPHIC_ELEMENT:
                return [element or "integer"]
            if t in _POLYMORPHIC_ARRAY:
                return [f"{element or 'integer'}[]"]
            return [t, *_BETTER.get(t, [])]

        for combination in itertools.product(*(concrete(t) for t in argtypes)):
            yield list(combination), element


def _return_type(returns: str, element: str | None) -> str | None:
    if returns in _POLYMORPHIC_ELEMENT:
        return element
    if returns in _POLYMORPHIC_ARRAY:
        return f"{element}[]" if element else None
    if returns in _UNUSABLE and returns != "void":
        return None
    return returns


_FUNCTIONS = """
SELECT p.proname, p.proretset, format_type(p.prorettype, NULL),
       coalesce((SELECT array_agg(format_type(t, NULL) ORDER BY i)
                 FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY AS a(t, i)), '{}')
FROM pg_proc p
WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.proname = ANY(%s) AND p.prokind = 'f'
  AND p.provariadic = 0 AND p.pronargs BETWEEN 1 AND 3
ORDER BY 1, 4
"""

_OPERATORS = """
SELECT o.oprname, format_type(o.oprleft, NULL), format_type(o.oprright, NULL), format_type(o.oprresult, NULL)
FROM pg_operator o
WHERE o.oprnamespace = 'pg_catalog'::regnamespace AND o.oprname = ANY(%s) AND o.oprleft <> 0
ORDER BY 1, 2, 3
"""


def _warn(signature: str) -> str:
    literal = signature.replace("'", "''")
    return (
        f"IF pg_catalog.current_setting('application_name') OPERATOR(pg_catalog.=) '{APPLICATION_NAME}' THEN "
        f"RAISE WARNING '{MARK} %', '{literal}'; END IF;"
    )


def shadow_statements(conn: psycopg.Connection[tuple[Any, ...]]) -> list[str]:
    """CREATE statements for every look-alike the engine's SQL could meet (run as the hostile role)."""
    statements: list[str] = []
    existing: set[tuple[str, tuple[str, ...]]] = set()
    rows = conn.execute(_FUNCTIONS, (sorted(called_names()),)).fetchall()
    for name, _, _, argtypes in rows:
        existing.add((str(name), tuple(argtypes)))
    planted: set[tuple[str, tuple[str, ...]]] = set()
    for name, retset, returns, argtypes in rows:
        name = str(name)
        for variant, element in _variants(list(argtypes)):
            key = (name, tuple(variant))
            if key in existing or key in planted or any(t in _UNUSABLE for t in variant):
                continue
            result = _return_type(str(returns), element)
            if result is None:
                continue
            planted.add(key)
            casts = ", ".join(
                f"${i}"
                if original in _POLYMORPHIC_ELEMENT | _POLYMORPHIC_ARRAY or original == '"any"'
                else f"${i}::{original}"
                for i, original in enumerate(argtypes, start=1)
            )
            signature = f"public.{name}({', '.join(variant)})"
            if retset:
                forward = f"RETURN QUERY SELECT * FROM pg_catalog.{name}({casts});"
                result = f"SETOF {result}"
            elif result == "void":
                forward = f"PERFORM pg_catalog.{name}({casts});"
            else:
                forward = f"RETURN pg_catalog.{name}({casts});"
            statements.append(
                f"CREATE FUNCTION {signature} RETURNS {result} LANGUAGE plpgsql AS "
                f"$shadow$ BEGIN {_warn(signature)} {forward} END $shadow$"
            )
    operators = conn.execute(_OPERATORS, (sorted(used_operators()),)).fetchall()
    existing_operators = {(str(o), str(left), str(right)) for o, left, right, _ in operators}
    for number, (symbol, left, right, result) in enumerate(operators):
        for lefts, rights in itertools.product(
            [left, *_BETTER.get(str(left), [])], [right, *_BETTER.get(str(right), [])]
        ):
            operator_key = (str(symbol), lefts, rights)
            if operator_key in existing_operators or any(
                t in _UNUSABLE | _POLYMORPHIC_ELEMENT | _POLYMORPHIC_ARRAY for t in (lefts, rights, str(result))
            ):
                continue
            existing_operators.add(operator_key)
            function = f"public.matview_shadow_op_{number}_{len(statements)}"
            signature = f"public.{symbol}({lefts}, {rights})"
            statements.append(
                f"CREATE FUNCTION {function}({lefts}, {rights}) RETURNS {result} LANGUAGE plpgsql AS "
                f"$shadow$ BEGIN {_warn(signature)} RETURN $1::{left} OPERATOR(pg_catalog.{symbol}) $2::{right}; END "
                "$shadow$"
            )
            statements.append(
                f"CREATE OPERATOR public.{symbol} (LEFTARG = {lefts}, RIGHTARG = {rights}, FUNCTION = {function})"
            )
    return statements


def plant_in_template(admin_dsn: str, template_dsn: str) -> int:
    """Create the hostile role and its look-alikes in template1; return how many objects were planted."""
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        if admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,)).fetchone() is None:
            admin.execute(f"CREATE ROLE {ROLE} LOGIN")
    with psycopg.connect(template_dsn, autocommit=True) as template:
        template.execute(f"GRANT USAGE, CREATE ON SCHEMA public TO {ROLE}")
        template.execute(f"SET ROLE {ROLE}")
        statements = shadow_statements(template)
        with template.transaction():
            for statement in statements:
                template.execute(statement.encode())
        template.execute("RESET ROLE")
    return len(statements)


class ShadowLog:
    """The server log, read from where the last look stopped, for the warnings the look-alikes write."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.offset = log.stat().st_size if log.exists() else 0

    def take(self) -> list[str]:
        """The shadow calls logged since the last take."""
        if not self.log.exists():
            return []
        with self.log.open("rb") as handle:
            handle.seek(self.offset)
            text = handle.read()
        self.offset += len(text)
        return [line for line in text.decode(errors="replace").splitlines() if MARK in line]
