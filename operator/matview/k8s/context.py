"""Process-wide state of the operator, created at startup and handed to handlers through kopf's memo."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from matview.observe.metrics import DEFAULT_PORT, RefreshMetrics
from matview.refresh.runner import Refresher, RunnerSettings


@dataclass(frozen=True)
class OperatorConfig:
    """Operator settings; ``matview operator`` flags map onto these."""

    metrics_port: int = DEFAULT_PORT
    """Port of the Prometheus /metrics endpoint (0 disables it)."""
    drift_check_seconds: float = 300.0
    """How often every resource is re-applied to repair hand-made changes."""
    retry_seconds: float = 30.0
    """Delay before retrying a reconcile that failed for a reason that may pass (database down, no Secret)."""
    stalled_retry_seconds: float = 300.0
    """Delay before re-checking a resource that only a user change can fix."""
    daemon_poll_seconds: float = 5.0
    """How often the refresh daemon looks at the live spec and the refresh-requested annotation."""
    max_concurrent_per_database: int = 2
    """Refreshes that may run at once against one database."""


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
        return len(self.refresher._pools)
