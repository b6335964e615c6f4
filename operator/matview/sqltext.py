"""The one audited door through which text from outside becomes SQL.

Everything else in the package composes SQL from ``psycopg.sql`` pieces:
``SQL()`` only on constants, names through ``Identifier``, values as
parameters. Three kinds of text cannot be expressed that way and are handled
here, all by the real PostgreSQL parser (pglast):

- the user's view query (``spec.query``): exactly one plain SELECT;
- partial-index predicates (``where``): exactly one expression;
- definitions of dependent views read back from the catalog during a swap.

Each is parsed, its tree checked, and then *re-printed from the tree*; the
re-printed text is what enters SQL, so comments, trailing statements or
anything the parser did not see as part of the checked node can never reach
the server. ``embed`` is the single function that turns checked text into
``psycopg.sql.SQL``; a ``CheckedSQL`` can only be made by the checkers below.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from pglast import ast, parse_sql
from pglast.parser import ParseError
from pglast.stream import RawStream
from pglast.visitors import Visitor
from psycopg import sql

_TOKEN = object()

_FORBIDDEN_NODES: dict[type[Any], str] = {
    ast.InsertStmt: "an INSERT",
    ast.UpdateStmt: "an UPDATE",
    ast.DeleteStmt: "a DELETE",
    ast.MergeStmt: "a MERGE",
    ast.IntoClause: "SELECT INTO",
    ast.LockingClause: "FOR UPDATE/SHARE",
}


@dataclass(frozen=True)
class CheckedSQL:
    """Text that passed one of the checkers; only they can construct it."""

    text: str
    kind: str
    _token: object = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._token is not _TOKEN:
            raise TypeError("CheckedSQL is made only by matview.sqltext's checkers")

    @property
    def digest(self) -> str:
        """A stable hash of the re-printed text: equal for queries that differ only in layout."""
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


def embed(fragment: CheckedSQL) -> sql.SQL:
    """THE audited function: the only place where non-constant text becomes SQL."""
    if not isinstance(fragment, CheckedSQL):
        raise TypeError("only CheckedSQL may be embedded into SQL")
    return sql.SQL(fragment.text)  # checked and re-printed by pglast: see the module docstring


def _parse(text: str, wrapper: str = "") -> tuple[Any, ...]:
    if "\x00" in text:
        raise ValueError("must not contain a NUL character")
    try:
        return tuple(parse_sql(wrapper + text))
    except ParseError as exc:
        message, *rest = exc.args
        at = rest[0] - len(wrapper) if rest and isinstance(rest[0], int) else -1
        where = f" (at character {at + 1})" if 0 <= at <= len(text) else ""
        raise ValueError(f"is not valid SQL: {message}{where}") from None


class _ForbiddenFinder(Visitor):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def visit(self, ancestors: Any, node: Any) -> None:
        for node_type, words in _FORBIDDEN_NODES.items():
            if isinstance(node, node_type):
                self.found.append(words)


def _forbidden_parts(node: Any) -> list[str]:
    finder = _ForbiddenFinder()
    finder(node)
    return sorted(set(finder.found))


def _check_select(text: str, kind: str) -> CheckedSQL:
    statements = _parse(text)
    if len(statements) != 1:
        raise ValueError(f"must be exactly one statement, found {len(statements)}")
    statement = statements[0].stmt
    if not isinstance(statement, ast.SelectStmt):
        raise ValueError(f"must be a SELECT, found {type(statement).__name__.removesuffix('Stmt').upper()}")
    forbidden = _forbidden_parts(statement)
    if forbidden:
        raise ValueError("must be a plain SELECT; it contains " + ", ".join(forbidden))
    return CheckedSQL(RawStream()(statement), kind, _TOKEN)


def check_query(text: str) -> CheckedSQL:
    """Check a view query: one plain SELECT, no data-modifying CTE, no INTO, no locking clause."""
    return _check_select(text, "query")


def check_view_definition(text: str) -> CheckedSQL:
    """Check a dependent view's definition read from pg_get_viewdef before re-creating it."""
    return _check_select(text, "view definition")


_PREDICATE_WRAPPER = "SELECT 1 WHERE "


def check_predicate(text: str) -> CheckedSQL:
    """Check a partial-index predicate: exactly one boolean expression, no subquery."""
    statements = _parse(text, _PREDICATE_WRAPPER)
    statement = statements[0].stmt if len(statements) == 1 else None
    if not isinstance(statement, ast.SelectStmt) or statement.whereClause is None:
        raise ValueError("must be exactly one boolean expression")
    extra = [
        slot
        for slot in statement.__slots__  # type: ignore[attr-defined]
        if slot not in {"targetList", "whereClause", "limitOption", "op", "all", "groupDistinct"}
        and getattr(statement, slot) not in (None, ())
    ]
    if extra or len(statement.targetList or ()) != 1 or statement.op != 0:
        raise ValueError("must be exactly one boolean expression, not a clause or statement")

    class _SubqueryFinder(Visitor):
        found = False

        def visit_SubLink(self, ancestors: Any, node: Any) -> None:
            self.found = True

    finder = _SubqueryFinder()
    finder(statement.whereClause)
    if finder.found or _forbidden_parts(statement.whereClause):
        raise ValueError("must not contain a subquery")
    return CheckedSQL(RawStream()(statement.whereClause), "predicate", _TOKEN)


def parse_qualified_name(text: str, default_schema: str = "public") -> tuple[str, str]:
    """Split ``schema.table`` (either part may be double-quoted) into its two names."""
    statements = _parse(text, "SELECT FROM ")
    statement = statements[0].stmt if len(statements) == 1 else None
    relation = None
    if isinstance(statement, ast.SelectStmt) and statement.fromClause and len(statement.fromClause) == 1:
        relation = statement.fromClause[0]
    others = [
        slot
        for slot in (statement.__slots__ if statement is not None else ())
        if slot not in {"fromClause", "limitOption", "op", "all", "groupDistinct"}
        and getattr(statement, slot) not in (None, ())
    ]
    if (
        not isinstance(relation, ast.RangeVar)
        or others
        or relation.alias is not None
        or relation.catalogname is not None
        or not relation.inh
    ):
        raise ValueError("must be a table name written as schema.table")
    return (relation.schemaname or default_schema, str(relation.relname))
