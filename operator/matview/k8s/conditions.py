"""Condition types and reasons: the one place where their names are defined.

Conditions follow metav1.Condition (type, status, observedGeneration,
lastTransitionTime, reason, message) and kstatus: ``Ready`` for health,
``Reconciling`` while work is pending or being retried, ``Stalled`` when only a
change by the user can help. ``Refreshed`` reports the last refresh; incremental views
add ``Fresh`` (target lag) and ``Verified`` (comparison with a full recompute).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Final

from matview import timestamps

READY: Final = "Ready"
RECONCILING: Final = "Reconciling"
STALLED: Final = "Stalled"
REFRESHED: Final = "Refreshed"
FRESH: Final = "Fresh"
"""Incremental views with a target lag: whether the oldest unapplied change is within it."""
VERIFIED: Final = "Verified"
"""Incremental views with verifyInterval: whether the last comparison with a full recompute matched."""

# Reasons (CamelCase, as metav1.Condition requires).
RECONCILED: Final = "Reconciled"
INVALID_SPEC: Final = "InvalidSpec"
# (Reasons about Secrets, not secrets: the S105 suppressions below are for the linter.)
SECRET_NOT_FOUND: Final = "SecretNotFound"  # noqa: S105
SECRET_KEY_MISSING: Final = "SecretKeyMissing"  # noqa: S105
SECRET_FORBIDDEN: Final = "SecretForbidden"  # noqa: S105
DATABASE_UNREACHABLE: Final = "DatabaseUnreachable"
API_UNREACHABLE: Final = "ApiUnreachable"
OBJECT_CONFLICT: Final = "ObjectConflict"
DEPENDENT_OBJECTS: Final = "DependentObjects"
APPLY_FAILED: Final = "ApplyFailed"
BUSY: Final = "Busy"
SPEC_TOO_LARGE: Final = "SpecTooLarge"
DELETION_BLOCKED: Final = "DeletionBlocked"
REFRESH_SUCCEEDED: Final = "RefreshSucceeded"
REFRESH_FAILED: Final = "RefreshFailed"
REFRESH_SKIPPED: Final = "RefreshSkipped"
RETRYING: Final = "Retrying"
WITHIN_TARGET_LAG: Final = "WithinTargetLag"
TARGET_LAG_MISSED: Final = "TargetLagMissed"
VERIFICATION_PASSED: Final = "VerificationPassed"
VERIFICATION_MISMATCH: Final = "VerificationMismatch"
VERIFICATION_INCONCLUSIVE: Final = "VerificationInconclusive"
DONE: Final = "Done"

Condition = dict[str, Any]


timestamp = timestamps.rfc3339


def set_condition(
    conditions: list[Condition] | None,
    *,
    type_: str,
    status: bool,
    reason: str,
    message: str,
    generation: int | None = None,
    now: dt.datetime | None = None,
) -> list[Condition]:
    """Return conditions with one replaced; lastTransitionTime moves only when the status flips."""
    value = "True" if status else "False"
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
