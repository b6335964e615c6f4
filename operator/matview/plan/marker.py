"""The ownership marker: a JSON COMMENT on every object the engine creates.

It lets the engine prove an object is its own before altering or dropping it,
and tells a DBA looking at ``\\d+`` which resource manages what. Objects without
a marker, or with another resource's, are never touched.

On the view itself the marker also carries the refresh state (last successful
refresh, measured durations per mode, the source version seen by the last
refresh) so that a standalone scheduler that restarts neither refreshes early
nor skips a run, and Auto mode keeps its evidence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from psycopg import sql

from matview.constants import MARKER_KEY, MARKER_VALUE


def comment_of(oid: sql.Composable) -> sql.Composed:
    """The comment (where a marker lives) of the relation whose oid is the expression oid, for a catalog read.
    Read from pg_description directly: ``obj_description`` is a SQL function, planned again at every call,
    which made it a third of the cost of the read every refresh starts with."""
    return sql.SQL(
        "(SELECT d.description FROM pg_catalog.pg_description d "
        "WHERE d.objoid = {oid} AND d.classoid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.objsubid = 0)"
    ).format(oid=oid)


MarkerKind = Literal["view", "index", "supporting", "staging", "changes", "capture", "live", "publication", "partition"]
MARKER_KINDS = ("view", "index", "supporting", "staging", "changes", "capture", "live", "publication", "partition")


@dataclass(frozen=True)
class Marker:
    owner: str
    """``namespace/name`` of the owning resource."""
    kind: MarkerKind
    digest: str
    """Hash of the definition the object was built from (query or index shape)."""
    state: dict[str, Any] = field(default_factory=dict, compare=False)
    """Refresh state kept on the view (see matview.refresh.RefreshState)."""

    def to_comment(self) -> str:
        data: dict[str, Any] = {MARKER_KEY: MARKER_VALUE, "owner": self.owner, "kind": self.kind, "digest": self.digest}
        if self.state:
            data["state"] = self.state
        return json.dumps(data, sort_keys=True)

    @classmethod
    def parse(cls, comment: str | None) -> Marker | None:
        """The marker in a comment, or None when the comment is not ours."""
        if not comment:
            return None
        try:
            data: Any = json.loads(comment)
        except ValueError:
            return None
        if not isinstance(data, dict) or data.get(MARKER_KEY) != MARKER_VALUE:
            return None
        owner, kind, digest = data.get("owner"), data.get("kind"), data.get("digest")
        if not isinstance(owner, str) or kind not in MARKER_KINDS:
            return None
        state = data.get("state")
        return cls(owner=owner, kind=kind, digest=str(digest or ""), state=state if isinstance(state, dict) else {})
