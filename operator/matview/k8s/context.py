"""Process-wide state of the operator, created at startup and handed to handlers through kopf's memo."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from matview.observe.metrics import DEFAULT_PORT, RefreshMetrics
from matview.plan.planner import ApplyPolicy
from matview.refresh.refresher import Refresher
from matview.refresh.settings import RunnerSettings


@dataclass(frozen=True)
class OperatorConfig:
    """Operator settings; ``matview operator`` flags map onto these."""

    metrics_port: int = DEFAULT_PORT
    """Port of the Prometheus /metrics endpoint (0 disables it)."""
    drift_check_seconds: float = RunnerSettings.drift_check_seconds
    """How often every resource is re-applied to repair hand-made changes."""
    retry_seconds: float = RunnerSettings.retry_seconds
    """Delay before retrying a reconcile that failed for a reason that may pass (database down, no Secret)."""
    stalled_retry_seconds: float = 300.0
    """Delay before re-checking a resource that only a user change can fix."""
    busy_retry_seconds: float = RunnerSettings.busy_retry_seconds
    """Delay before retrying a reconcile or refresh that found the view locked (a refresh, or another replica,
    at work)."""
    max_concurrent_per_database: int = RunnerSettings.max_concurrent_per_database
    """Refreshes that may run at once against one database."""
    max_concurrent_drift_checks: int = RunnerSettings.max_concurrent_drift_checks
    """Drift checks that may run at once in the whole process (each database also caps its applies)."""
    secret_max_age_seconds: float = 60.0
    """How long a Secret read is reused (a failed connection reads it again at once)."""
    shard_index: int = 0
    """This replica's shard (see ``shard_count``)."""
    shard_count: int = 1
    """Replicas that split the views between them by a stable hash of namespace/name (1: no sharding)."""
    namespaces: tuple[str, ...] = ()
    """The namespaces watched (empty: every namespace)."""
    allow_superuser_run_as_role: bool = False
    """Accept a spec.runAsRole that is a superuser (refused by default)."""
    peering: str | None = None
    """kopf peering name (replicas then take turns); None: standalone."""


@dataclass
class OperatorContext:
    """What every handler shares: config, metrics, the refresher, and which database each resource uses."""

    config: OperatorConfig = field(default_factory=OperatorConfig)
    metrics: RefreshMetrics = field(default_factory=RefreshMetrics)
    refresher: Refresher = field(init=False)
    _databases: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.refresher = Refresher(
            self.metrics,
            RunnerSettings(
                max_concurrent_per_database=self.config.max_concurrent_per_database,
                retry_seconds=self.config.retry_seconds,
                busy_retry_seconds=self.config.busy_retry_seconds,
                drift_check_seconds=self.config.drift_check_seconds,
                max_concurrent_drift_checks=self.config.max_concurrent_drift_checks,
                apply_policy=ApplyPolicy(allow_superuser_run_as_role=self.config.allow_superuser_run_as_role),
            ),
        )

    def bind(self, resource: str, dsn: str) -> None:
        """Record that resource uses dsn; a pool nobody uses any more is closed."""
        with self._lock:
            previous = self._databases.get(resource)
            self._databases[resource] = dsn
            orphaned = previous is not None and previous != dsn and previous not in self._databases.values()
        if orphaned and previous is not None:
            self.refresher.close_pool(previous)

    def release(self, resource: str) -> None:
        with self._lock:
            previous = self._databases.pop(resource, None)
            orphaned = previous is not None and previous not in self._databases.values()
        if orphaned and previous is not None:
            self.refresher.close_pool(previous)

    def pools_open(self) -> int:
        return len(self.refresher.databases())
