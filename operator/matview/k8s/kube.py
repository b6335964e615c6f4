"""The few Kubernetes API calls the operator makes itself, beside kopf's.

Secrets are read at most once per ``SECRET_MAX_AGE_SECONDS`` each (a rotation is seen within that
time, or at once when a refresh fails to connect and ``forget_secret`` drops the copy), so the API load
grows with the number of Secrets, not with refreshes. Every status write goes through ``patch_status``:
change the status, patch it with the resourceVersion it was read at, and on a conflict read again and
retry — so the reconcile handlers and the scheduler never overwrite each other's conditions; a 429 or 5xx
is retried after the apiserver's Retry-After or a backoff, as kopf does for its own writes. A writer
that already holds the object (the scheduler, from the watch) passes it as ``known``: no read, one
PATCH, and no request at all when the change leaves the status as it is.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException

from matview.constants import GROUP, PLURAL, VERSION
from matview.k8s.conditions import Status

logger = logging.getLogger(__name__)

#: (connect, read) seconds for every call: the client has no timeout of its own, and a call hanging on an
#: apiserver that restarts would stall the daemon that made it forever.
REQUEST_TIMEOUT = (10, 30)


@functools.cache
def api_client() -> Any:
    """The Kubernetes client's configured ApiClient, one per process (in the cluster: its service account; else
    $KUBECONFIG), for the calls the operator makes beside kopf's."""
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))  # type: ignore[no-untyped-call]
    return kubernetes.client.ApiClient()


def reset() -> None:
    """Forget the loaded configuration and what was read with it (tests point the operator at another server)."""
    api_client.cache_clear()
    _LAST_SECRETS.clear()


class SecretForbiddenError(Exception):
    """RBAC does not let the operator read Secrets in this namespace."""


def _read_secret(namespace: str, name: str) -> dict[str, str] | None:
    try:
        secret = kubernetes.client.CoreV1Api(api_client()).read_namespaced_secret(
            name, namespace, _request_timeout=REQUEST_TIMEOUT
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        if exc.status == 403:
            raise SecretForbiddenError(namespace) from None
        raise
    return {str(k): str(v) for k, v in (secret.data or {}).items()}


#: The last Secret data read, by (namespace, name), with when it was read (time.monotonic()): reused for
#: SECRET_MAX_AGE_SECONDS, and for as long as the API cannot be reached.
_LAST_SECRETS: dict[tuple[str, str], tuple[float, dict[str, str]]] = {}

#: How long a Secret read is reused before the API is asked again.
SECRET_MAX_AGE_SECONDS = 60.0


def forget_secret(namespace: str, name: str) -> None:
    """Drop the copy of a Secret (its credentials were just refused): the next use reads it again."""
    _LAST_SECRETS.pop((namespace, name), None)


class ApiUnreachableError(Exception):
    """The Kubernetes API did not answer (connection refused, timeout)."""


async def read_secret(
    namespace: str, name: str, max_age_seconds: float = SECRET_MAX_AGE_SECONDS
) -> dict[str, str] | None:
    """The Secret's base64 data, or None when it does not exist; SecretForbiddenError when RBAC refuses.

    While the API is unreachable the last data read is used: views keep refreshing through an apiserver
    outage with the credentials they had (ApiUnreachableError when there are none yet)."""
    known = _LAST_SECRETS.get((namespace, name))
    if known is not None and time.monotonic() - known[0] < max_age_seconds:
        return known[1]
    try:
        data = await asyncio.to_thread(_read_secret, namespace, name)
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        if known is None:
            raise ApiUnreachableError(str(exc)) from None
        return known[1]
    if data is None:
        _LAST_SECRETS.pop((namespace, name), None)
    else:
        _LAST_SECRETS[(namespace, name)] = (time.monotonic(), data)
    return data


def _read_view(namespace: str, name: str) -> dict[str, Any] | None:
    api = kubernetes.client.CustomObjectsApi(api_client())
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


#: Answers that mean "later, not never": the apiserver's rate limiting (429, with Retry-After) and its own
#: failures (5xx, e.g. while etcd elects a leader). kopf retries its own writes on them; ours do too.
RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
#: First pause before such a retry (doubled each time, with jitter), and the longest.
RETRY_BACKOFF_SECONDS = 0.5
MAX_RETRY_BACKOFF_SECONDS = 10.0


def _pause_before_retry(exc: ApiException, attempt: int) -> float:
    """How long to wait after a retried answer: the apiserver's Retry-After when it gives one (bounded)."""
    headers = exc.headers or {}
    try:
        asked = float(headers.get("Retry-After") or headers.get("retry-after") or "")
    except ValueError:
        asked = None
    backoff = RETRY_BACKOFF_SECONDS * 2**attempt * (1 + random.random() / 2)  # noqa: S311 - jitter
    return min(MAX_RETRY_BACKOFF_SECONDS, asked if asked is not None and asked >= 0 else backoff)


def _patch_status(
    namespace: str,
    name: str,
    change: Callable[[Status], Status],
    known: Mapping[str, Any] | None = None,
    attempts: int = 5,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any] | None:
    api = kubernetes.client.CustomObjectsApi(api_client())
    current = known
    for attempt in range(attempts):
        if current is None:
            try:
                current = _read_view(namespace, name)
            except ApiException as exc:
                if exc.status not in RETRIED_STATUSES or attempt == attempts - 1:
                    raise
                sleep(_pause_before_retry(exc, attempt))
                continue
            if current is None:
                return None
        # The object as the API holds it: shaped as the CRD's schema declares (the apiserver validates it).
        before = cast(Status, current.get("status") or {})
        after = change(copy.deepcopy(before))
        if after == before:
            return dict(current)
        removed = {key: None for key in before if key not in after}  # merge patch deletes with null
        body = {
            "metadata": {"resourceVersion": current.get("metadata", {}).get("resourceVersion")},
            "status": {**removed, **after},
        }
        try:
            return cast(
                dict[str, Any],
                api.patch_namespaced_custom_object_status(
                    GROUP, VERSION, namespace, PLURAL, name, body, _request_timeout=REQUEST_TIMEOUT
                ),
            )
        except ApiException as exc:
            if exc.status == 409:
                current = None  # someone wrote in between: read again and re-apply the change
                continue
            if exc.status == 404:
                return None
            if exc.status in RETRIED_STATUSES and attempt < attempts - 1:
                logger.info("%s/%s: status write answered %s; retrying", namespace, name, exc.status)
                sleep(_pause_before_retry(exc, attempt))
                continue  # the object as known is still the one to patch: a conflict would say otherwise
            raise
    logger.warning("%s/%s: status not written after %d attempts", namespace, name, attempts)
    return None


async def patch_status(
    namespace: str, name: str, change: Callable[[Status], Status], known: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """Apply change(status) -> new status, safely against concurrent writers; return the object as written.

    With known (the object as last seen, with its resourceVersion) the first attempt reads nothing.
    None if the object is gone, or if the API cannot be reached (logged; the next write carries the
    state again)."""
    try:
        return await asyncio.to_thread(_patch_status, namespace, name, change, known)
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        logger.warning("%s/%s: status not written, the API is unreachable: %s", namespace, name, exc)
        return None
