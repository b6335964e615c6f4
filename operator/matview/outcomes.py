"""The words a refresh reports with, shared by every layer that speaks of refreshes.

They appear in status.lastRefresh, in the metrics' labels, in the CLI's output and in the scheduler's
rules, so each is defined once, here, as an enum (to prevent a direct usage of strings, as kopf does);
being ``str`` enums they print, compare and serialise as their values.
"""

from __future__ import annotations

import enum
from typing import Final


class Outcome(enum.StrEnum):
    """How one refresh attempt ended. BUSY is a skip that decided nothing: another process held the view."""

    SUCCESS = "success"
    FAILURE = "failure"
    SKIPPED = "skipped"
    BUSY = "busy"


class FailureReason(enum.StrEnum):
    """Why a refresh failed: a bounded label set for metrics and status."""

    TIMEOUT = "timeout"
    LOCK_TIMEOUT = "lock_timeout"
    DUPLICATE_ROWS = "duplicate_rows"
    PERMISSION = "permission"
    CONNECTION = "connection"
    OTHER = "other"


#: The mode label of an attempt that ran no refresh (skipped, refused).
NO_MODE: Final = "none"
