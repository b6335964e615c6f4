"""Fuzz: thousands of hostile MaterializedView documents, none of which may crash validation.

Mutations start from the shipped examples and replace, delete or add values anywhere in them: wrong
types, huge and deeply nested values, unicode, NUL and control characters, quotes and semicolons in
identifiers; at the text level, spliced bytes, alias bombs and multi-document files. Every document
goes through the two entry points the product has: ``validate_document`` on a parsed body (what the
operator gets from the apiserver) and ``load_documents`` on YAML text (what the CLI reads). The only
acceptable outcomes are a valid spec or a ``SpecError`` whose every problem names a field; a sample
also runs through the ``matview validate`` process, where a crash would show as a signal or exit 1.

Hypothesis drives the generation with a fixed seed (``derandomize``), so CI runs the same 10,000+
cases every time and a failure reproduces locally.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from matview.api.validation import load_documents, validate_document
from matview.errors import SpecError

ROOT = Path(__file__).resolve().parents[2]
SEED_TEXTS = [
    (ROOT / "examples" / name).read_text()
    for name in ("quickstart.yaml", "driver-matrix.yaml", "driver-matrix-incremental.yaml", "driver-matrix-weekly.yaml")
]
SEEDS = [yaml.safe_load(text) for text in SEED_TEXTS]
#: The examples set neither searchPath nor runAsRole; one seed does, so mutations reach those fields too.
SEEDS.append({**SEEDS[0], "spec": {**SEEDS[0]["spec"], "searchPath": ["app", "reports"], "runAsRole": "team_a"}})
#: The incremental example with one source declared append-only (and no live view, which refuses it), so
#: mutations reach appendOnly and its column.
_APPENDED = copy.deepcopy(SEEDS[2])
_APPENDED["spec"]["incremental"]["sources"][2]["appendOnly"] = {"column": "trip_id"}
_APPENDED["spec"]["incremental"]["liveView"] = False
SEEDS.append(_APPENDED)

#: Generated documents per property: 10,000 in all, weighted to the cheap in-process path (pure-Python YAML
#: parsing dominates the other two).
BODY_EXAMPLES, FILE_EXAMPLES, TEXT_EXAMPLES = 6000, 2500, 1500

#: A refusal names a field: a dotted path from the document's root, or one of the whole-input labels.
FIELD = re.compile(r"^(\((yaml|document|file)\)|[A-Za-z_][\w-]*)(\.[A-Za-z_]|\[|$)")

#: No per-test timeout below the suite's: the work is fixed (derandomized) and takes about a minute on a quiet
#: core, so the timeout only guards against a hang; a 120 s one failed CI on a slower, busier machine.
FUZZ_SETTINGS = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)

ATTACKS = [
    "",
    "\x00",
    "a\x00b",
    "\x07\x1b[2J",
    '"; DROP TABLE public.sentinel; --',
    "'; DROP TABLE public.sentinel; --",
    "x; SELECT pg_sleep(100)",
    'a"b',
    "a'b",
    "$$",
    "\\",
    "\u202etxt.exe",
    "ﬁ" * 40,
    "é" * 40,
    "x" * 63,
    "x" * 64,
    "public.sentinel",
    '"public"."sentinel"',
    "pg_catalog",
    "pg_temp",
    "SELECT 1; SELECT 2",
    "SELECT " + "1+" * 1500 + "1",
    "SELECT " + "(" * 2000 + "1" + ")" * 2000,
    "SELECT * FROM a.b WHERE x = ANY(ARRAY[" + ",".join(["1"] * 3000) + "])",
    "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
    "SELECT 1 INTO t",
    "SELECT * FROM t FOR UPDATE",
    "x IN (SELECT 1)",
    "0 * * * *",
    "61 * * * *",
    "0 0 30 2 *",
    "Europe/Nowhere",
    "../../etc/passwd",
    "600h",
    "99999999999h",
    "1" * 40 + "h",
    "0.0001ms",
    "Concurrent",
    "Delete",
]

text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(ATTACKS),
    st.integers(min_value=1_000, max_value=150_000).map(lambda n: "x" * n),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**30, max_value=10**60),
    st.integers(min_value=4000, max_value=6000).map(lambda digits: 10**digits),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("-inf"), -1, -0.0, 1.0000001, 2, 10**400]),  # bounds of numbers
    text,
)
#: How far into a list mutations look, and how many one document gets (``paths``, ``mutated_documents``).
REACHED_ITEMS, MAX_MUTATIONS = 40, 4
#: Lists far over any maxItems (15,000 sources in half a megabyte), to be refused before a deep look.
LONG_LIST_SIZES = (33, 100, 1_000, 15_000)
_LONG_LISTS = {n: [{"table": f"a.b{i}", "columns": ["k"]} for i in range(n)] for n in LONG_LIST_SIZES}


def long_list(n: int) -> list[Any]:
    """A fresh list of n sources. Building 15,000 dicts per example was a fifth of this file's time; mutations
    reach only the first ``REACHED_ITEMS`` items (``paths``), so those are copied and the rest shared. Each
    deletion of an item moves the next one into reach: with fewer copies, a later mutation changed a shared
    item in place, a later example was generated from that changed list, and Hypothesis, replaying the same
    choices, drew a different document (``FlakyStrategyDefinition``)."""
    shared = _LONG_LISTS[n]
    copied = REACHED_ITEMS + MAX_MUTATIONS
    return copy.deepcopy(shared[:copied]) + shared[copied:]


long_lists = st.sampled_from(LONG_LIST_SIZES).map(long_list)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


hostile = st.one_of(values, st.integers(min_value=60, max_value=3000).map(nested))
#: For the parsed-body path only: pure-Python YAML takes seconds to write and read a 15,000-item list.
hostile_or_long = st.one_of(hostile, long_lists)


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a document, down to the depth of the API itself (not into planted deep values)."""
    yield prefix
    if len(prefix) >= 8:
        return
    if isinstance(node, dict):
        for key, child in node.items():
            yield from paths(child, (*prefix, key))
    elif isinstance(node, list):
        for i, child in enumerate(node[:REACHED_ITEMS]):  # a planted 15,000-item list is mutated near its start
            yield from paths(child, (*prefix, i))


def parent_of(document: Any, path: tuple[Any, ...]) -> Any:
    for key in path[:-1]:
        document = document[key]
    return document


@st.composite
def mutated_documents(draw: st.DrawFn, planted: st.SearchStrategy[Any] = hostile) -> Any:
    document: Any = copy.deepcopy(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(min_value=1, max_value=MAX_MUTATIONS))):
        path = draw(st.sampled_from(list(paths(document))))
        action = draw(st.sampled_from(["replace", "replace", "delete", "add", "duplicate"]))
        if not path:
            document = draw(planted) if action == "replace" else document
            continue
        parent, key = parent_of(document, path), path[-1]
        if action == "replace":
            parent[key] = draw(planted)
        elif action == "delete":
            del parent[key]
        elif action == "add" and isinstance(parent[key], dict):
            parent[key][draw(st.one_of(st.text(max_size=12), st.sampled_from(ATTACKS[:12])))] = draw(planted)
        elif action == "add" and isinstance(parent[key], list):
            parent[key].append(draw(planted))
        elif action == "duplicate" and isinstance(parent, list):
            parent.append(parent[key])
    return document


def alias_bomb(width: int, levels: int) -> str:
    lines = ["a: &a [" + ",".join(['"lol"'] * width) + "]"]
    for i in range(1, levels):
        name, previous = f"l{i}", "a" if i == 1 else f"l{i - 1}"
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * width) + "]")
    return "\n".join(lines)


@st.composite
def mutated_texts(draw: st.DrawFn) -> str:
    source = draw(st.sampled_from(SEED_TEXTS))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        at = draw(st.integers(min_value=0, max_value=len(source)))
        action = draw(st.sampled_from(["insert", "delete", "duplicate", "bomb", "documents", "indent"]))
        if action == "insert":
            piece = draw(st.one_of(st.text(max_size=12), st.sampled_from([*ATTACKS[:14], "&x", "*x", "<<: *x", "!!"])))
            source = source[:at] + piece + source[at:]
        elif action == "delete":
            source = source[:at] + source[at + draw(st.integers(min_value=1, max_value=40)) :]
        elif action == "duplicate":
            source = source[:at] + source[at : at + 200] * draw(st.integers(min_value=2, max_value=8)) + source[at:]
        elif action == "bomb":
            bomb = alias_bomb(
                draw(st.integers(min_value=2, max_value=12)), draw(st.integers(min_value=2, max_value=12))
            )
            source = source.replace("spec:\n", "spec:\n  " + bomb.replace("\n", "\n  ") + "\n", 1)
        elif action == "documents":
            source = "\n---\n".join([source] * draw(st.integers(min_value=2, max_value=4)))
        else:
            source = source.replace("\n", "\n" + " " * draw(st.integers(min_value=1, max_value=3)), 1)
    return source


def assert_refusal_names_fields(error: SpecError) -> None:
    assert error.errors, "a SpecError without problems"
    for problem in error.errors:
        assert FIELD.match(problem.path), f"refusal does not name a field: {problem.path!r}: {problem.message}"
        assert problem.message.strip(), f"{problem.path}: empty message"
        assert len(problem.message) < 600, f"{problem.path}: unbounded message ({len(problem.message)} chars)"


@settings(FUZZ_SETTINGS, max_examples=BODY_EXAMPLES)
@given(mutated_documents(hostile_or_long))
def test_parsed_bodies_validate_or_are_refused_naming_the_field(document: Any) -> None:
    try:
        view = validate_document(document, "fuzz")
    except SpecError as exc:
        assert_refusal_names_fields(exc)
        return
    if view.incremental is not None:
        ratio = view.incremental.full_rebuild_ratio
        assert ratio is None or 0 <= ratio <= 1, f"fullRebuildRatio {ratio!r} was accepted"


@settings(FUZZ_SETTINGS, max_examples=FILE_EXAMPLES)
@given(mutated_documents())
def test_yaml_files_validate_or_are_refused_naming_the_field(document: Any) -> None:
    try:
        # Writing the file is the test's own step, not the product's: libyaml's emitter where there is one.
        text = yaml.dump(document, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False)
    except (yaml.YAMLError, ValueError, RecursionError):
        return  # a value PyYAML cannot write (a 5,000-digit integer, 3,000 levels) is the parsed-body test's
    try:
        load_documents(text, "fuzz.yaml")
    except SpecError as exc:
        assert_refusal_names_fields(exc)


@settings(FUZZ_SETTINGS, max_examples=TEXT_EXAMPLES)
@given(mutated_texts())
def test_mangled_yaml_text_validates_or_is_refused_naming_the_field(source: str) -> None:
    try:
        load_documents(source, "fuzz.yaml")
    except SpecError as exc:
        assert_refusal_names_fields(exc)


SAMPLE_FOR_THE_CLI = [
    "spec: " + "[" * 3000 + "]" * 3000,
    alias_bomb(10, 10),
    SEED_TEXTS[0].replace("day::date AS day", "1" + "+1" * 30_000 + " AS day"),
    SEED_TEXTS[0].replace("interval: 1h", "interval: 99999999999h"),
    SEED_TEXTS[0].replace("columns: [day]", "columns: [1]"),
    SEED_TEXTS[1].replace("indexes:", "indexes: [5]\n  ignored:", 1),
    SEED_TEXTS[1].replace("schema: ops", 'schema: "ops\\"; DROP TABLE x; --"'),
    "\n---\n".join(SEED_TEXTS * 3),
    "\x00\x01\x02",
]


@pytest.mark.timeout(300)
def test_the_cli_process_survives_a_sample(tmp_path: Path) -> None:
    files = []
    for i, source in enumerate(SAMPLE_FOR_THE_CLI):
        file = tmp_path / f"sample{i}.yaml"
        file.write_text(source)
        files.append(file)
    for file in files:
        done = subprocess.run(
            [sys.executable, "-m", "matview.cli", "validate", str(file)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode in (0, 2), f"{file.name}: exit {done.returncode}\n{done.stderr[-2000:]}"
        assert "Traceback" not in done.stderr, done.stderr[-2000:]
        if done.returncode == 2:
            problems = [line.strip() for line in done.stderr.splitlines()[1:] if line.strip()]
            assert problems and all(FIELD.match(p.split(": ", 1)[0]) for p in problems), done.stderr[-2000:]
