"""Refresh a materialized view without blocking readers, safely, and say what happened.

The same shape as apply: under the view's lock, ``facts.inspect`` reads the catalog, ``policy.decide``
(pure) picks refuse, skip or a mode, the executor runs that mode's steps, and on a failure that a rebuild
fixes ``policy.fallback`` picks the one other mode to try. The last step records the new state in the
view's marker. The result value says what ran, why, how long, and how it ended; metrics, status and logs
are written from it by the callers.

Modes (``spec.refresh.mode``): Concurrent (``REFRESH ... CONCURRENTLY``: readers keep reading), Swap
(build a copy with its indexes, rename it in: readers wait only for the rename), Full (plain ``REFRESH``:
blocks readers), Auto (a non-blocking mode chosen from durations measured on this view).

Safety: one lock per view (a row only the operator may write) covers the whole refresh, across processes and replicas
(``executor.view_lock``); ``statement_timeout`` and ``lock_timeout`` on every step, with retries for steps
that wait for ACCESS EXCLUSIVE; a failed or timed-out refresh leaves the old data readable.
"""

from matview.refresh.attempt import RefreshResult, apply_and_record, record_build, refresh
from matview.refresh.facts import ViewSize, read_state, view_size
from matview.refresh.policy import EXPLORE_EVERY, Inspection, RefreshState, choose_mode, classify

__all__ = [
    "EXPLORE_EVERY",
    "Inspection",
    "RefreshResult",
    "RefreshState",
    "ViewSize",
    "apply_and_record",
    "choose_mode",
    "classify",
    "read_state",
    "record_build",
    "refresh",
    "view_size",
]
