"""YAML from outside, read within bounds: size, nesting depth, alias expansion and number length.

Every file the CLI reads is untrusted. Plain ``yaml.safe_load`` is not enough:
a "billion laughs" document of nested aliases is small on disk and expands to
billions of nodes when anything walks it; 5,000 levels of nesting overflow the
composer's recursion; a 5,000-digit integer trips Python's int-conversion
limit. This loader composes with the pure-Python SafeLoader, counts as it goes,
and stops with a ``yaml.YAMLError`` (line and column included) the moment a
bound is passed, so a hostile file costs at most a bounded amount of time and
memory and never a traceback.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml import nodes

#: Largest file read, in bytes: a few documents of the CRD's largest query (131,072 characters) fit.
MAX_BYTES = 2 * 1024 * 1024
#: Deepest nesting of mappings and lists; a MaterializedView needs fewer than ten levels.
MAX_DEPTH = 64
#: Nodes in one document once aliases are expanded (what a walk over the loaded data would visit).
MAX_EXPANDED_NODES = 100_000
#: Documents in one file.
MAX_DOCUMENTS = 1000
#: Digits of an integer; the API has none longer than a few.
MAX_INTEGER_DIGITS = 32


class BoundExceeded(yaml.MarkedYAMLError):
    """The document passes one of the bounds above."""


class _BoundedLoader(yaml.SafeLoader):
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._expanded = 0
        self._sizes: dict[int, int] = {}

    def compose_document(self) -> Any:
        self._expanded = 0
        self._sizes = {}
        return super().compose_document()

    def compose_node(self, parent: Any, index: Any) -> Any:
        mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
        if self.check_event(yaml.AliasEvent):
            node = super().compose_node(parent, index)
            self._count(self._sizes.get(id(node), 1), mark)
            return node
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise BoundExceeded(None, None, f"nesting is deeper than {MAX_DEPTH} levels", mark)
        before = self._expanded
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._count(1, mark)
        # What an alias to this node would add: the node and everything under it, aliases expanded.
        self._sizes[id(node)] = self._expanded - before
        return node

    def _count(self, nodes_added: int, mark: Any) -> None:
        self._expanded += nodes_added
        if self._expanded > MAX_EXPANDED_NODES:
            raise BoundExceeded(
                None, None, f"expands to more than {MAX_EXPANDED_NODES} values (aliases included)", mark
            )

    def construct_yaml_int(self, node: nodes.ScalarNode) -> int:
        digits = sum(ch.isdigit() for ch in str(node.value))
        if digits > MAX_INTEGER_DIGITS:
            raise BoundExceeded(
                None, None, f"an integer has {digits} digits; at most {MAX_INTEGER_DIGITS} are allowed", node.start_mark
            )
        value: int = super().construct_yaml_int(node)
        return value


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)


def load_all(text: str) -> list[Any]:
    """Every document of text, in order (empty documents dropped); raises yaml.YAMLError past a bound."""
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > MAX_BYTES:
        raise BoundExceeded(None, None, f"is {size} bytes; at most {MAX_BYTES} are read", None)
    loader = _BoundedLoader(text)
    documents: list[Any] = []
    try:
        while loader.check_data():  # type: ignore[no-untyped-call]
            if len(documents) >= MAX_DOCUMENTS:
                raise BoundExceeded(None, None, f"has more than {MAX_DOCUMENTS} documents", None)
            document = loader.get_data()
            if document is not None:
                documents.append(document)
    finally:
        loader.dispose()
    return documents
