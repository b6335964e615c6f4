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
import urllib3
from kubernetes.client.exceptions import ApiException

from matview.constants import GROUP, PLURAL, VERSION

logger = logging.getLogger(__name__)

#: (connect, read) seconds for every call: the client has no timeout of its own, and a call hanging on an
#: apiserver that restarts would stall the daemon that made it forever.
REQUEST_TIMEOUT = (10, 30)

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
        secret = kubernetes.client.CoreV1Api(_api_client()).read_namespaced_secret(
            name, namespace, _request_timeout=REQUEST_TIMEOUT
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        if exc.status == 403:
            raise SecretForbiddenError(namespace) from None
        raise
    return {str(k): str(v) for k, v in (secret.data or {}).items()}


#: The last Secret data read, by (namespace, name): used while the API cannot be reached.
_LAST_SECRETS: dict[tuple[str, str], dict[str, str]] = {}


class ApiUnreachableError(Exception):
    """The Kubernetes API did not answer (connection refused, timeout)."""


async def read_secret(namespace: str, name: str) -> dict[str, str] | None:
    """The Secret's base64 data, or None when it does not exist; SecretForbiddenError when RBAC refuses.

    While the API is unreachable the last data read is used: views keep refreshing through an apiserver
    outage with the credentials they had (ApiUnreachableError when there are none yet)."""
    try:
        data = await asyncio.to_thread(_read_secret, namespace, name)
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        known = _LAST_SECRETS.get((namespace, name))
        if known is None:
            raise ApiUnreachableError(str(exc)) from None
        return known
    if data is None:
        _LAST_SECRETS.pop((namespace, name), None)
    else:
        _LAST_SECRETS[(namespace, name)] = data
    return data


def _read_view(namespace: str, name: str) -> dict[str, Any] | None:
    api = kubernetes.client.CustomObjectsApi(_api_client())
    try:
        found = cast(
            dict[str, Any],
            api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, _request_timeout=REQUEST_TIMEOUT),
        )
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
            api.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, body, _request_timeout=REQUEST_TIMEOUT
            )
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
    """Apply change(status) -> new status, safely against concurrent writers. False if the object is gone,
    or if the API cannot be reached (logged; the next write carries the state again)."""
    try:
        return await asyncio.to_thread(_patch_status, namespace, name, change)
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        logger.warning("%s/%s: status not written, the API is unreachable: %s", namespace, name, exc)
        return False
