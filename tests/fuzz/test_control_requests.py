"""Fuzz: what a local process may send to ``matview run``'s control socket (cli/control.py).

Every line is either a request the run then checks against what it serves (absolute paths, bounded, and a
database identity) or a reason to decline; nothing raises. Hypothesis with a fixed seed, as test_documents.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from matview.cli import control

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
REQUEST_LIKE = st.fixed_dictionaries(
    {"refresh": st.lists(st.text(max_size=80) | JSON_VALUES, max_size=5) | JSON_VALUES, "database": JSON_VALUES},
    optional={"sql": JSON_VALUES},
)


def check(line: bytes) -> None:
    outcome = control._request(line)
    if isinstance(outcome, str):
        assert outcome  # a reason to decline, said
        return
    files, identity = outcome
    assert isinstance(identity, str) and len(identity) <= 128
    assert 0 < len(files) <= control.MAX_FILES
    assert all(isinstance(f, str) and os.path.isabs(f) and len(f) <= 4096 for f in files)


@settings(max_examples=1500, derandomize=True, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_a_request_or_a_reason(line: bytes) -> None:
    check(line)


@settings(max_examples=1500, derandomize=True, deadline=None)
@given(REQUEST_LIKE)
def test_request_shaped_json_is_a_request_or_a_reason(value: dict[str, Any]) -> None:
    check(json.dumps(value).encode() + b"\n")


def test_deep_nesting_within_the_size_bound_is_a_reason() -> None:
    check(b"[" * (control.MAX_REQUEST_BYTES - 1) + b"\n")
    check(b'{"refresh": ' * 10_000 + b"\n")
