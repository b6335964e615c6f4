"""What the one scheduler (``scheduler``) and its feeders give each other: the feeder's ``Work`` (how it
reaches a view's database, refreshes and applies) and ``Sink`` (how it reports), and the values that pass
between them. A feeder needs nothing else from the scheduler's insides; the scheduler nothing from a feeder's.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Protocol

from matview.api.spec import MaterializedView
from matview.outcomes import Outcome
from matview.refresh.attempt import RefreshResult

#: A relation as (schema, name): what a view is stored as, and what it reads.
Relation = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class Applied:
    """How an apply or a drift check ended."""

    outcome: Outcome
    """SUCCESS, FAILURE, or BUSY (another process held the view's lock)."""
    last_success: dt.datetime | None = None
    """The view's last success as the database records it (a build counts): the schedule counts from it."""
    changed: bool = False
    """The database was changed (a drift check repaired something)."""
    message: str = ""
    """What was done, or what went wrong."""
    error: BaseException | None = None
    retry_seconds: float | None = None
    """A failure's own delay before the next attempt (else the usual one)."""
    reads: frozenset[Relation] | None = None
    """The relations the view reads, when the apply learned them (else asked for before its next refresh)."""


@dataclasses.dataclass(frozen=True)
class Report:
    """What the scheduler decided after a refresh, for the sink to report with the result."""

    next_due: dt.datetime | None
    """The next scheduled refresh (None: only on request)."""
    retry_in_seconds: float | None
    """After a failure: how long until the next attempt."""
    handled_request: str | None
    """The manual request this refresh acted on."""


class Work(Protocol):
    """What a feeder does with its views: how it reaches their database and applies them."""

    @property
    def applies(self) -> bool:
        """True: the scheduler applies views not applied yet (``matview run``). False: someone else does
        (kopf's create/update handlers) and the scheduler only checks applied views for drift."""

    async def refresh(
        self, key: str, view: MaterializedView, *, manual: bool, due_at: float | None
    ) -> RefreshResult | None:
        """One refresh (due_at: when the schedule wanted it, for lateness). None: the round could not reach
        the refresh (credentials missing) and has reported why; it backs off like a failure."""
        ...

    async def apply(self, key: str, view: MaterializedView, *, drift_check: bool) -> Applied:
        """Make the database match the spec (a drift check when the view was applied before)."""
        ...

    async def reads(self, key: str, view: MaterializedView) -> frozenset[Relation]:
        """The relations the view reads (through plain views)."""
        ...


class Sink(Protocol):
    """How a feeder reports what happened (status and Events; logs). Metrics are the refresher's."""

    def scheduled(self, key: str, view: MaterializedView, due: dt.datetime | None, now: dt.datetime) -> None:
        """The next refresh of an applied view is due at due (None: only on request)."""

    async def refreshed(self, key: str, view: MaterializedView, result: RefreshResult, report: Report) -> None:
        """A refresh ended (not busy)."""

    def applied(self, key: str, view: MaterializedView, applied: Applied, *, drift_check: bool, next_in: float) -> None:
        """An apply or drift check ended; next_in: seconds until the next one."""
