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

Text from outside is hostile, so parsing it must not crash the process: the C
parser recurses once per nesting level and pglast's printer about six Python
frames per level. Every parse therefore runs in one dedicated thread with a
large stack, its tree is measured without recursion and refused beyond
``MAX_NESTING_DEPTH`` levels, and only then is it checked and re-printed, with
a recursion limit that fits that depth.
"""

from __future__ import annotations

import functools
import hashlib
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pglast import ast, parse_sql
from pglast.parser import ParseError
from pglast.stream import RawStream
from pglast.visitors import Visitor
from psycopg import sql

from matview import comparisons
from matview.api.parsing import MAX_NESTING_DEPTH, PARSER, nesting_depth

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
            raise TypeError("CheckedSQL is made only by matview.api.sqltext's checkers")

    @property
    def digest(self) -> str:
        """A stable hash of the re-printed text: equal for queries that differ only in layout."""
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


def pinned_search_path(schemas: tuple[str, ...] = ()) -> str:
    """The search_path every statement that compiles user SQL runs under: pg_catalog first, pg_temp last, and
    between them only the schemas the spec lists (spec.searchPath). With the session default (``"$user",
    public``) any role that may create objects in public could shadow a function the query calls with a
    better-matching one of its own, and the operator's role would run it."""
    quoted = ['"' + schema.replace('"', '""') + '"' for schema in schemas]
    return ", ".join(["pg_catalog", *quoted, "pg_temp"])


#: SQLSTATEs of a name that did not resolve: under the pinned search_path, most likely an unqualified name.
UNRESOLVED_NAME_SQLSTATES = frozenset({"42P01", "42883", "42704", "3F000", "42P02"})


def explain_unresolved(message: str, sqlstate: str | None, schemas: tuple[str, ...]) -> str:
    """message, plus what to do when it says a name in the user's SQL did not resolve under the pinned
    search_path (the server's message alone would not say why an unqualified name is not found)."""
    if sqlstate not in UNRESOLVED_NAME_SQLSTATES:
        return message
    return (
        f"{message} (names resolve only in {pinned_search_path(schemas)}: write the name as schema.name, "
        "or list its schema in spec.searchPath)"
    )


def embed(fragment: CheckedSQL) -> sql.SQL:
    """THE audited function: the only place where non-constant text becomes SQL."""
    if not isinstance(fragment, CheckedSQL):
        raise TypeError("only CheckedSQL may be embedded into SQL")
    return sql.SQL(fragment.text)  # checked and re-printed by pglast: see the module docstring


def _parse(text: str, wrapper: str = "") -> tuple[Any, ...]:
    """Parse on the parser thread (callers of this run there already); refuse trees nested too deeply."""
    if "\x00" in text:
        raise ValueError("must not contain a NUL character")
    try:
        statements = tuple(parse_sql(wrapper + text))
    except ParseError as exc:
        message, *rest = exc.args
        message = message if len(message) <= 200 else message[:150] + "…" + message[-40:]  # the token may be huge
        at = rest[0] - len(wrapper) if rest and isinstance(rest[0], int) else -1
        where = f" (at character {at + 1})" if 0 <= at <= len(text) else ""
        raise ValueError(f"is not valid SQL: {message}{where}") from None
    depth = max((nesting_depth(s) for s in statements), default=0)
    if depth > MAX_NESTING_DEPTH:
        raise ValueError(f"nests {depth} levels deep; at most {MAX_NESTING_DEPTH} are allowed")
    return statements


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
    return PARSER.run(lambda: _check_select(text, "query"))


@functools.lru_cache(maxsize=512)
def check_view_definition(text: str) -> CheckedSQL:
    """Check a view's definition read from pg_get_viewdef (dependents re-created by a swap, views inlined by
    a key-filter rewrite). Cached: an incremental refresh reads the same few definitions every time."""
    return PARSER.run(lambda: _check_select(text, "view definition"))


_PREDICATE_WRAPPER = "SELECT 1 WHERE "


def check_predicate(text: str) -> CheckedSQL:
    """Check a partial-index predicate: exactly one boolean expression, no subquery."""
    return PARSER.run(lambda: _check_predicate(text))


def _check_predicate(text: str) -> CheckedSQL:
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
    return PARSER.run(lambda: _parse_qualified_name(text, default_schema))


def _parse_qualified_name(text: str, default_schema: str) -> tuple[str, str]:
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


# --- Key-filter injection (incremental refresh) -------------------------------------------------------------

RelationName = tuple[str, str]
"""(schema, name) of a relation, as the catalog resolved it."""

Reference = tuple[str | None, str]
"""(schema or None, name) of a relation as written in a query."""

#: Where the changed keys of one incremental refresh are during its transaction (a temporary table).
CHANGED_KEYS_TABLE: RelationName = ("pg_temp", "matview_changed_keys")

#: comparisons.KEY_EQUALS as text, for the rewrite of the user's query.
_KEY_EQUALS = comparisons.KEY_EQUALS.as_string(None)


@dataclass(frozen=True)
class ResolvedRelation:
    """What a name in a query is: a table (filtered when declared) or a view (inlined when it reads one)."""

    name: RelationName
    relkind: str
    definition: CheckedSQL | None = None
    """A plain view's definition (read back from the catalog with every name qualified)."""


KeyCatalog = Mapping[Reference, ResolvedRelation]
"""What every name a query reads resolves to. Read-only: one resolution serves many refreshes."""


def quote_identifier(name: str) -> str:
    """PostgreSQL's double-quoting of one name (for text that pglast parses back, never sent as is)."""
    return '"' + name.replace('"', '""') + '"'


def qualified_label(schema: str, name: str) -> str:
    """schema.name as a key of the engine's own bookkeeping (a lock's row, a watermark), quoted so that
    ``"a.b"."c"`` and ``"a"."b.c"`` differ; a label, never sent as SQL."""
    return f"{quote_identifier(schema)}.{quote_identifier(name)}"


def relations_read(text: CheckedSQL) -> list[Reference]:
    """The relations a checked query or view definition names in FROM, CTE references left out."""
    return list(_relations_read_cached(text))


@functools.lru_cache(maxsize=512)
def _relations_read_cached(text: CheckedSQL) -> tuple[Reference, ...]:
    return tuple(PARSER.run(lambda: _relations_read(text)))


def _cte_names(statement: Any) -> set[str]:
    class _Ctes(Visitor):
        def __init__(self) -> None:
            super().__init__()
            self.names: set[str] = set()

        def visit_CommonTableExpr(self, ancestors: Any, node: Any) -> None:
            self.names.add(str(node.ctename))

    finder = _Ctes()
    finder(statement)
    return finder.names


def _relations_read(text: CheckedSQL) -> list[Reference]:
    statement = _parse(text.text)[0].stmt
    ctes = _cte_names(statement)
    found: list[Reference] = []

    class _Names(Visitor):
        def visit_RangeVar(self, ancestors: Any, node: Any) -> None:
            reference = (node.schemaname, str(node.relname))
            if (node.schemaname is None and node.relname in ctes) or reference in found:
                return
            found.append(reference)

    _Names()(statement)
    return found


@dataclass(frozen=True)
class KeyFilterResult:
    query: CheckedSQL
    filtered: frozenset[RelationName]
    """The declared sources the rewrite wrapped at least once."""
    inlined: tuple[RelationName, ...]
    """Views whose definitions were inlined to reach a declared source."""


def inject_key_filters(
    query: CheckedSQL,
    catalog: KeyCatalog,
    sources: dict[RelationName, tuple[str, ...]],
    key_columns: tuple[str, ...],
    keys_table: tuple[str, ...] | None = CHANGED_KEYS_TABLE,
) -> KeyFilterResult:
    """The query with every read of a declared source replaced by that source filtered on the changed keys
    (read from ``keys_table``, the refresh's temporary table; or, with None, equal to the parameters $1..$n:
    one key, as the live view's function computes it).

    ``catalog`` resolves each name the query (and each inlined view) reads; ``sources`` maps a declared
    table to its columns that give the view's key. Views are inlined (their definitions put in place as
    subqueries under the same alias) only where they read a declared source, because PostgreSQL does not
    push a key predicate through aggregates or FULL JOINs: the filter has to sit where the rows are read.
    """
    return _inject_cached(query, tuple(catalog.items()), tuple(sorted(sources.items())), key_columns, keys_table)


@functools.lru_cache(maxsize=64)
def _inject_cached(
    query: CheckedSQL,
    catalog: tuple[tuple[Reference, ResolvedRelation], ...],
    sources: tuple[tuple[RelationName, tuple[str, ...]], ...],
    key_columns: tuple[str, ...],
    keys_table: tuple[str, ...] | None,
) -> KeyFilterResult:
    """Cached: every incremental refresh of a view rewrites the same query against the same catalog."""
    return PARSER.run(lambda: _inject(query, dict(catalog), dict(sources), key_columns, keys_table))


def _reads_source(name: RelationName, catalog: KeyCatalog, sources: dict[RelationName, Any], seen: set[Any]) -> bool:
    if name in sources:
        return True
    if name in seen:
        return False
    seen.add(name)
    resolved = catalog.get(name)
    if resolved is None or resolved.definition is None:
        return False
    return any(
        (found := catalog.get(reference)) is not None and _reads_source(found.name, catalog, sources, seen)
        for reference in _relations_read_cached(resolved.definition)
    )


def _inject(
    query: CheckedSQL,
    catalog: KeyCatalog,
    sources: dict[RelationName, tuple[str, ...]],
    key_columns: tuple[str, ...],
    keys_relation: tuple[str, ...] | None,
) -> KeyFilterResult:
    if keys_relation is None:
        keys = f"{_KEY_EQUALS} (" + ", ".join(f"${position}" for position in range(1, len(key_columns) + 1)) + ")"
    else:
        keys_table = ".".join(quote_identifier(part) for part in keys_relation)
        keys = f"{_KEY_EQUALS} ANY (SELECT {', '.join(quote_identifier(c) for c in key_columns)} FROM {keys_table})"
    predicates = {
        name: f"({', '.join(quote_identifier(c) for c in columns)}) {keys}" for name, columns in sources.items()
    }
    return _filter_reads(query, catalog, predicates)


def period_predicate(column: str, lower: str, upper: str) -> str:
    """A source's rows of one period (``lower`` <= column < ``upper``): text for ``inject_source_filters``. The
    bounds are the engine's own date literals (``partitions.bound_literal``), checked here to be nothing else."""
    _check_bounds(lower, upper)
    return _period_text(column, lower, upper)


def _period_text(column: str, lower: str, upper: str) -> str:
    left = quote_identifier(column)
    return f"({left} OPERATOR(pg_catalog.>=) '{lower}' AND {left} OPERATOR(pg_catalog.<) '{upper}')"


def _check_bounds(*bounds: str) -> None:
    for bound in bounds:
        if not _BOUND.fullmatch(bound):
            raise ValueError(f"not a period bound: {bound!r}")


_BOUND = re.compile(r"\d{4}-\d{2}-\d{2} 00:00:00\+00")
#: Stand-ins for a period's bounds in a query rewritten once for every period (``period_slices``): string
#: constants no user's SQL holds (a nonce drawn when the process starts), replaced by each period's bounds.
_SLICE_NONCE = secrets.token_hex(12)
_SLICE_LOWER = f"'matview-period-from-{_SLICE_NONCE}'"
_SLICE_UPPER = f"'matview-period-to-{_SLICE_NONCE}'"


@dataclass(frozen=True)
class PeriodSlices:
    """The query rewritten once with every read of the partition sources filtered to a period whose bounds are
    stand-ins: each period's query is that text with its bounds put in, instead of a parse and print of the
    whole query per period (43 ms each for the driver matrix, with the interpreter held: a rebuild of 53
    partitions spent 2.3 s of it)."""

    template: str

    def query(self, lower: str, upper: str) -> CheckedSQL:
        _check_bounds(lower, upper)
        text = self.template.replace(_SLICE_LOWER, f"'{lower}'").replace(_SLICE_UPPER, f"'{upper}'")
        return CheckedSQL(text, "query", _TOKEN)


def period_slices(query: CheckedSQL, catalog: KeyCatalog, columns: dict[RelationName, str]) -> PeriodSlices:
    """The query sliced by period at its reads of the tables in ``columns`` (each filtered on its column), ready
    to take any period's bounds (``PeriodSlices.query``); the same text ``inject_source_filters`` makes with
    ``period_predicate``s."""
    return PARSER.run(lambda: _period_slices_cached(query, tuple(catalog.items()), tuple(sorted(columns.items()))))


@functools.lru_cache(maxsize=64)
def _period_slices_cached(
    query: CheckedSQL,
    catalog: tuple[tuple[Reference, ResolvedRelation], ...],
    columns: tuple[tuple[RelationName, str], ...],
) -> PeriodSlices:
    stand_ins = {name: _period_text(column, _SLICE_LOWER[1:-1], _SLICE_UPPER[1:-1]) for name, column in columns}
    text = _filter_reads(query, dict(catalog), stand_ins).query.text
    # Every occurrence of the nonce must be one of the stand-ins the rewrite put in, printed as written.
    if text.count(_SLICE_NONCE) != text.count(_SLICE_LOWER) + text.count(_SLICE_UPPER):
        raise ValueError("the query cannot be sliced by period")
    return PeriodSlices(text)


def inject_source_filters(
    query: CheckedSQL, catalog: KeyCatalog, predicates: dict[RelationName, str]
) -> KeyFilterResult:
    """The query with every read of a table in ``predicates`` filtered by its predicate (``period_predicate``'s
    text: the engine's own), inlining views on the way as the key filters do."""
    return PARSER.run(lambda: _filter_reads_cached(query, tuple(catalog.items()), tuple(sorted(predicates.items()))))


@functools.lru_cache(maxsize=256)
def _filter_reads_cached(
    query: CheckedSQL,
    catalog: tuple[tuple[Reference, ResolvedRelation], ...],
    predicates: tuple[tuple[RelationName, str], ...],
) -> KeyFilterResult:
    return _filter_reads(query, dict(catalog), dict(predicates))


def _filter_reads(query: CheckedSQL, catalog: KeyCatalog, predicates: dict[RelationName, str]) -> KeyFilterResult:
    filtered: set[RelationName] = set()
    inlined: list[RelationName] = []

    # A source or a view read several times (the driver matrix reads one table 12 times) is parsed and rewritten
    # once: the tree is only printed afterwards, so one subtree may stand in several places.
    filters: dict[tuple[RelationName, bool], Any] = {}
    rewritten_views: dict[tuple[CheckedSQL, int], Any] = {}

    def source_filter(name: RelationName, predicate: str, inherit: bool) -> Any:
        if (name, inherit) not in filters:
            template = f"SELECT * FROM {quote_identifier(name[0])}.{quote_identifier(name[1])} WHERE {predicate}"
            subquery = _parse(template)[0].stmt
            if not inherit:  # ONLY: keep it inside the wrapper
                subquery.fromClause[0].inh = False
            filters[(name, inherit)] = subquery
        return filters[(name, inherit)]

    def rewrite(text: CheckedSQL, depth: int) -> Any:
        if (text, depth) not in rewritten_views:
            rewritten_views[(text, depth)] = rewrite_once(text, depth)
        return rewritten_views[(text, depth)]

    def rewrite_once(text: CheckedSQL, depth: int) -> Any:
        if depth > 32:
            raise ValueError("views nest more than 32 levels deep on the way to a declared source")
        statement = _parse(text.text)[0].stmt
        ctes = _cte_names(statement)

        class _Rewriter(Visitor):
            def visit_RangeVar(self, ancestors: Any, node: Any) -> Any:
                if node.schemaname is None and node.relname in ctes:
                    return None
                resolved = catalog.get((node.schemaname, str(node.relname)))
                if resolved is None:
                    return None
                alias = node.alias or ast.Alias(aliasname=str(node.relname))
                if resolved.name in predicates:
                    filtered.add(resolved.name)
                    subquery = source_filter(resolved.name, predicates[resolved.name], bool(node.inh))
                    return ast.RangeSubselect(lateral=False, subquery=subquery, alias=alias)
                if resolved.definition is not None and _reads_source(resolved.name, catalog, predicates, set()):
                    inlined.append(resolved.name)
                    return ast.RangeSubselect(
                        lateral=False, subquery=rewrite(resolved.definition, depth + 1), alias=alias
                    )
                return None

        return _Rewriter()(statement)

    rewritten = rewrite(query, 0)
    text = RawStream()(rewritten)
    if nesting_depth(_parse(text)[0].stmt) > MAX_NESTING_DEPTH:
        raise ValueError(f"the rewritten query nests more than {MAX_NESTING_DEPTH} levels deep")
    return KeyFilterResult(CheckedSQL(text, "query", _TOKEN), frozenset(filtered), tuple(dict.fromkeys(inlined)))
