"""The few Kubernetes API calls the operator makes itself, beside kopf's.

Secrets are read fresh on every use (rotation without restarts). Every status
write goes through ``patch_status``: read, change, patch with the
resourceVersion read, retry on conflict — so the reconcile handler and the
refresh daemon never overwrite each other's conditions.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import os
from collections.abc import Callable
from typing import Any, cast

import kubernetes
from kubernetes.client.exceptions import ApiException

from matview.constants import GROUP, PLURAL, VERSION

logger = logging.getLogger(__name__)

Status = dict[str, Any]


@functools.cache
def _api_client() -> Any:
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))  # type: ignore[no-untyped-call]
    return kubernetes.client.ApiClient()


def reset() -> None:
    """Forget the loaded configuration (tests point the operator at another server)."""
    _api_client.cache_clear()


class SecretForbiddenError(Exception):
    """RBAC does not let the operator read Secrets in this namespace."""


def _read_secret(namespace: str, name: str) -> dict[str, str] | None:
    try:
        secret = kubernetes.client.CoreV1Api(_api_client()).read_namespaced_secret(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        if exc.status == 403:
            raise SecretForbiddenError(namespace) from None
        raise
    return {str(k): str(v) for k, v in (secret.data or {}).items()}


async def read_secret(namespace: str, name: str) -> dict[str, str] | None:
    """The Secret's base64 data, or None when it does not exist; SecretForbiddenError when RBAC refuses."""
    return await asyncio.to_thread(_read_secret, namespace, name)


def _read_view(namespace: str, name: str) -> dict[str, Any] | None:
    api = kubernetes.client.CustomObjectsApi(_api_client())
    try:
        found = cast(dict[str, Any], api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return found


def _patch_status(namespace: str, name: str, change: Callable[[Status], Status], attempts: int = 5) -> bool:
    api = kubernetes.client.CustomObjectsApi(_api_client())
    for _ in range(attempts):
        current = _read_view(namespace, name)
        if current is None:
            return False
        before = current.get("status") or {}
        after = change(copy.deepcopy(before))
        if after == before:
            return True
        removed = {key: None for key in before if key not in after}  # merge patch deletes with null
        body = {
            "metadata": {"resourceVersion": current.get("metadata", {}).get("resourceVersion")},
            "status": {**removed, **after},
        }
        try:
            api.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, body)
            return True
        except ApiException as exc:
            if exc.status == 409:
                continue  # someone wrote in between: read again and re-apply the change
            if exc.status == 404:
                return False
            raise
    logger.warning("%s/%s: status not written after %d conflicting attempts", namespace, name, attempts)
    return False


async def patch_status(namespace: str, name: str, change: Callable[[Status], Status]) -> bool:
    """Apply change(status) -> new status, safely against concurrent writers. False if the object is gone."""
    return await asyncio.to_thread(_patch_status, namespace, name, change)
