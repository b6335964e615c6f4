"""kopf settings: our own finalizer and storage names, event posting, watch timeouts, peering.

Everything kopf writes on our objects lives under ``matview.dev``. The last-handled
configuration is stored with the query replaced by its digest: Kubernetes limits
all annotations of an object to 256 KiB together, and a 100 KiB query kept
verbatim beside kubectl's own last-applied copy would not fit.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from typing import Any

import kopf

from matview.constants import FINALIZER, PREFIX
from matview.k8s.context import OperatorConfig


class CompactDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """The last-handled spec, with the (possibly huge) query kept as a digest: changes still show as diffs."""

    def build(self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None) -> Any:
        essence = super().build(body=body, extra_fields=extra_fields)
        spec = essence.get("spec")
        if isinstance(spec, dict) and isinstance(spec.get("query"), str):
            spec["query"] = "sha256:" + hashlib.sha256(spec["query"].encode()).hexdigest()
        return essence


def configure(settings: kopf.OperatorSettings, peering: str | None) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = CompactDiffBaseStorage(prefix=PREFIX, key="last-handled-configuration")
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    # We watch one resource kind in fixed namespaces (or all): no need to scan CRDs or namespaces,
    # which would need RBAC we otherwise do not use.
    settings.scanning.disabled = True
    if peering:
        settings.peering.name = peering
        settings.peering.standalone = False
        settings.peering.mandatory = True
    else:
        settings.peering.standalone = True


def config_from_environment() -> OperatorConfig:
    """``matview operator`` passes its flags as MATVIEW_* variables, so ``kopf run -m`` works the same."""
    defaults = OperatorConfig()

    def number(name: str, default: float) -> float:
        value = os.environ.get(name)
        return float(value) if value else default

    return OperatorConfig(
        metrics_port=int(number("MATVIEW_METRICS_PORT", defaults.metrics_port)),
        drift_check_seconds=number("MATVIEW_DRIFT_CHECK_SECONDS", defaults.drift_check_seconds),
        retry_seconds=number("MATVIEW_RETRY_SECONDS", defaults.retry_seconds),
        stalled_retry_seconds=number("MATVIEW_STALLED_RETRY_SECONDS", defaults.stalled_retry_seconds),
        daemon_poll_seconds=number("MATVIEW_DAEMON_POLL_SECONDS", defaults.daemon_poll_seconds),
        max_concurrent_per_database=int(number("MATVIEW_MAX_CONCURRENT", defaults.max_concurrent_per_database)),
    )
