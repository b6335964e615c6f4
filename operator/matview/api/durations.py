"""Go-style durations (``90s``, ``5m``, ``1h30m``, ``250ms``) as Kubernetes users write them."""

from __future__ import annotations

import re

_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Return the duration in seconds, or raise ValueError saying what is wrong."""
    if not isinstance(text, str) or not text:
        raise ValueError("must be a duration such as 90s, 5m or 1h30m")
    position = 0
    total = 0.0
    for match in _PART.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if position != len(text):
        raise ValueError(f"{text!r} is not a duration such as 90s, 5m or 1h30m")
    return total
