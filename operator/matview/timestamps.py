"""The one timestamp format: RFC 3339 in UTC with a ``Z``, to the second, as Kubernetes writes times.

Status, JSON output, and the refresh state in a view's marker all use it, so a time read in one place
can be compared with a time read in another.
"""

from __future__ import annotations

import datetime as dt


def rfc3339(moment: dt.datetime | None = None) -> str:
    """moment (default now) as ``2026-11-28T04:26:03Z``."""
    return (
        (moment or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    )


def parse(value: object) -> dt.datetime | None:
    """A timestamp written by rfc3339 (or any ISO 8601 with an offset); None when absent or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)
