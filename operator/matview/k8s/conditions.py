"""Condition types and reasons: the one place where their names are defined.

Conditions follow metav1.Condition (type, status, observedGeneration,
lastTransitionTime, reason, message) and kstatus: ``Ready`` for health,
``Reconciling`` while work is pending or being retried, ``Stalled`` when only a
change by the user can help. ``Refreshed`` reports the last refresh; incremental views
add ``Fresh`` (target lag) and ``Verified`` (comparison with a full recompute).
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import NotRequired, TypedDict

from matview import timestamps


class ConditionType(enum.StrEnum):
    READY = "Ready"
    RECONCILING = "Reconciling"
    STALLED = "Stalled"
    REFRESHED = "Refreshed"
    FRESH = "Fresh"
    """Incremental views with a target lag: whether the oldest unapplied change is within it."""
    VERIFIED = "Verified"
    """Incremental views with verifyInterval: whether the last comparison with a full recompute matched."""


class ConditionStatus(enum.StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"

    @classmethod
    def of(cls, value: bool) -> ConditionStatus:
        return cls.TRUE if value else cls.FALSE


class Reason(enum.StrEnum):
    """Why a condition has its status: CamelCase, as metav1.Condition requires; an enum to prevent a direct
    usage of strings (as kopf does)."""

    RECONCILED = "Reconciled"
    INVALID_SPEC = "InvalidSpec"
    SECRET_NOT_FOUND = "SecretNotFound"  # noqa: S105 (about Secrets, not a secret)
    SECRET_KEY_MISSING = "SecretKeyMissing"  # noqa: S105
    SECRET_FORBIDDEN = "SecretForbidden"  # noqa: S105
    DATABASE_UNREACHABLE = "DatabaseUnreachable"
    API_UNREACHABLE = "ApiUnreachable"
    OBJECT_CONFLICT = "ObjectConflict"
    DEPENDENT_OBJECTS = "DependentObjects"
    APPLY_FAILED = "ApplyFailed"
    BUSY = "Busy"
    SPEC_TOO_LARGE = "SpecTooLarge"
    DELETION_BLOCKED = "DeletionBlocked"
    REFRESH_SUCCEEDED = "RefreshSucceeded"
    REFRESH_FAILED = "RefreshFailed"
    REFRESH_SKIPPED = "RefreshSkipped"
    RETRYING = "Retrying"
    WITHIN_TARGET_LAG = "WithinTargetLag"
    TARGET_LAG_MISSED = "TargetLagMissed"
    VERIFICATION_PASSED = "VerificationPassed"
    VERIFICATION_MISMATCH = "VerificationMismatch"
    VERIFICATION_INCONCLUSIVE = "VerificationInconclusive"
    DONE = "Done"


class Condition(TypedDict):
    """One metav1.Condition, as it is written to status.conditions."""

    type: str
    status: str
    reason: str
    message: str
    lastTransitionTime: str
    observedGeneration: NotRequired[int]


class LastRefresh(TypedDict):
    """status.lastRefresh: the last refresh attempt."""

    startTime: str
    completionTime: str
    durationSeconds: float
    mode: str
    result: str
    message: str


class RefreshProgress(TypedDict):
    """status.refreshProgress: how far a rebuild a partition at a time has got, while it runs."""

    startTime: str
    partitionsRebuilt: int
    partitionsToRebuild: int
    lastPartition: str
    message: str


class Status(TypedDict, total=False):
    """The status subresource, as crds/ declares it (every field optional: a new object has none)."""

    observedGeneration: int
    conditions: list[Condition]
    relation: str
    lastRefresh: LastRefresh
    refreshProgress: RefreshProgress
    lastSuccessfulRefreshTime: str
    nextRefreshTime: str
    lastHandledRefreshRequest: str
    rows: int
    sizeBytes: int
    dataVersion: int


timestamp = timestamps.rfc3339


def set_condition(
    conditions: list[Condition] | None,
    *,
    type_: ConditionType,
    status: bool,
    reason: Reason,
    message: str,
    generation: int | None = None,
    now: dt.datetime | None = None,
) -> list[Condition]:
    """Return conditions with one replaced; lastTransitionTime moves only when the status flips."""
    value = ConditionStatus.of(status)
    previous = next((c for c in conditions or [] if c.get("type") == type_), None)
    changed = previous is None or previous.get("status") != value
    condition: Condition = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message[:32000],
        "lastTransitionTime": timestamp(now) if changed else previous.get("lastTransitionTime", timestamp(now)),  # type: ignore[union-attr]
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    others = [c for c in conditions or [] if c.get("type") != type_]
    return sorted([*others, condition], key=lambda c: str(c.get("type")))


def get_condition(conditions: list[Condition] | None, type_: str) -> Condition | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)
