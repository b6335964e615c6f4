"""kopf settings: our own finalizer and storage names, event posting, watch timeouts, peering.

Everything kopf writes on our objects lives under ``matview.dev``. The last-handled
configuration is stored with the query replaced by its digest: Kubernetes limits
all annotations of an object to 256 KiB together, and a 100 KiB query kept
verbatim beside kubectl's own last-applied copy would not fit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Iterable, Mapping
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


#: How long kopf waits for its own write of an object to come back on the watch before it handles the object's
#: next change as if it had (kopf's default is 5 s). At thousands of views the watch runs that far behind after a
#: mass creation, and kopf, taking the object as still unhandled, ran its creation handler a second time for
#: nearly every view (3,000 views: 5,977 creations). Only an object whose write never comes back (a watch that
#: restarted in between) waits this long.
CONSISTENCY_TIMEOUT_SECONDS = 60.0


def configure(settings: kopf.OperatorSettings, peering: str | None) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = CompactDiffBaseStorage(prefix=PREFIX, key="last-handled-configuration")
    settings.persistence.consistency_timeout = CONSISTENCY_TIMEOUT_SECONDS
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    # Keep retrying through an apiserver outage (kopf's default gives up after about a minute and the
    # operator stops): doubling to 10 s, then every 10 s for two hours.
    settings.networking.error_backoffs = [1, 2, 4, 8, *([10] * 720)]
    # We watch one resource kind in fixed namespaces (or all): no need to scan CRDs or namespaces,
    # which would need RBAC we otherwise do not use.
    settings.scanning.disabled = True
    if peering:
        settings.peering.name = peering
        settings.peering.standalone = False
        settings.peering.mandatory = True
    else:
        settings.peering.standalone = True


class SettingsError(ValueError):
    """An operator setting has a value it cannot use; the message names the variable."""


#: Environment variable → (OperatorConfig field, smallest allowed value). ``matview operator`` gives the
#: operator its config directly; ``kopf run -m matview.k8s.main`` reads these when the operator starts.
ENVIRONMENT: dict[str, tuple[str, float]] = {
    "MATVIEW_METRICS_PORT": ("metrics_port", 0),
    "MATVIEW_DRIFT_CHECK_SECONDS": ("drift_check_seconds", 1),
    "MATVIEW_RETRY_SECONDS": ("retry_seconds", 0.1),
    "MATVIEW_STALLED_RETRY_SECONDS": ("stalled_retry_seconds", 0.1),
    "MATVIEW_BUSY_RETRY_SECONDS": ("busy_retry_seconds", 0.05),
    "MATVIEW_MAX_CONCURRENT": ("max_concurrent_per_database", 1),
    "MATVIEW_MAX_DRIFT_CHECKS": ("max_concurrent_drift_checks", 1),
    "MATVIEW_SECRET_MAX_AGE_SECONDS": ("secret_max_age_seconds", 0),
    "MATVIEW_SHARD_INDEX": ("shard_index", 0),
    "MATVIEW_SHARD_COUNT": ("shard_count", 1),
}


def config_from_environment(environ: Mapping[str, str] | None = None) -> OperatorConfig:
    """The config of ``kopf run -m matview.k8s.main``, from MATVIEW_* variables.

    Read once, when the operator starts; a bad value stops it with the variable's name.
    """
    environ = os.environ if environ is None else environ
    defaults = OperatorConfig()
    values: dict[str, Any] = {}
    for variable, (name, _) in ENVIRONMENT.items():
        text = environ.get(variable)
        if not text:
            continue
        integer = isinstance(getattr(defaults, name), int)
        try:
            value: float = int(text) if integer else float(text)
        except ValueError:
            kind = "an integer" if integer else "a number"
            raise SettingsError(f"{variable}={text!r}: must be {kind}") from None
        values[name] = value
    allow = environ.get("MATVIEW_ALLOW_SUPERUSER_RUN_AS_ROLE", "").strip().lower()
    if allow not in ("", "true", "false"):
        raise SettingsError(f"MATVIEW_ALLOW_SUPERUSER_RUN_AS_ROLE={allow!r}: must be true or false")
    values["allow_superuser_run_as_role"] = allow == "true"
    values["peering"] = environ.get("MATVIEW_PEERING") or None
    return checked(
        dataclasses.replace(defaults, **values), {name: variable for variable, (name, _) in ENVIRONMENT.items()}
    )


def checked(config: OperatorConfig, labels: Mapping[str, str]) -> OperatorConfig:
    """config, if every value is one the operator can use; else SettingsError naming the setting as the
    user wrote it (labels: field → variable or flag)."""
    for name, minimum in ENVIRONMENT.values():
        value = getattr(config, name)
        if not value >= minimum or value == float("inf"):
            raise SettingsError(f"{labels.get(name, name)}={value!r}: must be at least {minimum:g} and finite")
    if config.shard_index >= config.shard_count:
        raise SettingsError(
            f"{labels.get('shard_index', 'shard_index')}={config.shard_index}: must be below "
            f"{labels.get('shard_count', 'shard_count')}={config.shard_count}"
        )
    return config
