"""Writes each view's bucket label, so that shards select their views on the apiserver.

A shard's watch asks only for its buckets (``sharding.selector``). A view nobody has labelled yet (just
created, or from before labels existed, or labelled by hand with something that is no bucket) is in no
shard's selection, so every shard also watches those alone (``matview.dev/bucket notin (0,…,1023)``, which
also selects views without the label: few, and each only for a moment) and labels those it owns
with their bucket: one PATCH per view, by its owner (a rollout from one replica to n labels every view once,
not n times). The value is a pure function of namespace/name, so two replicas of different counts racing
in a rollout write the same thing. A label changed by hand is put back by the shard
whose selection it fell into (``main.relabel_handler``).

It runs in threads of the Kubernetes client (list, then watch from the list's resourceVersion, again after
each server timeout or error), apart from kopf's watch, which can have one selector per resource only.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, cast

import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException

from matview.constants import BUCKET_LABEL, GROUP, PLURAL, VERSION
from matview.k8s import kube, sharding

logger = logging.getLogger(__name__)

#: Views without a bucket label, or with one that names no bucket ("notin" selects both): in no shard's selection.
UNLABELLED = f"{BUCKET_LABEL} notin ({','.join(str(bucket) for bucket in range(sharding.BUCKETS))})"
#: Views per page of the list that precedes each watch.
LIST_PAGE = 500
#: A watch ends after this many seconds on the server; the loop lists again and watches on.
WATCH_SECONDS = 60
#: After an error, wait this long (doubling up to the most) before listing again.
ERROR_BACKOFF_SECONDS = 1.0
MAX_ERROR_BACKOFF_SECONDS = 30.0


def patch_for(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The merge patch that gives an object its bucket label (None: it has it)."""
    metadata = body.get("metadata") or {}
    namespace, name = str(metadata.get("namespace") or ""), str(metadata.get("name") or "")
    if not name:
        return None
    wanted = sharding.label_value(namespace, name)
    if (metadata.get("labels") or {}).get(BUCKET_LABEL) == wanted:
        return None
    return {"metadata": {"labels": {BUCKET_LABEL: wanted}}}


async def label(body: Mapping[str, Any]) -> None:
    """Give one object its bucket label, if it lacks it (a failure is logged: the next event tries again)."""
    try:
        await asyncio.to_thread(_label, kubernetes.client.CustomObjectsApi(kube.api_client()), body)
    except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
        logger.warning("cannot label a view with its bucket: %s", exc)


def _label(api: Any, body: Mapping[str, Any]) -> bool:
    """Patch the object's bucket label in if it lacks it; whether a patch was sent."""
    patch = patch_for(body)
    if patch is None:
        return False
    metadata = body.get("metadata") or {}
    try:
        api.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            metadata.get("namespace"),
            PLURAL,
            metadata.get("name"),
            patch,
            _request_timeout=kube.REQUEST_TIMEOUT,
        )
    except ApiException as exc:
        if exc.status == 404:  # deleted meanwhile
            return False
        raise
    return True


class Labeler:
    """Labels the unlabelled views it owns in some namespaces (all of them when none are given), until stopped."""

    def __init__(self, owns: Callable[[str, str], bool], namespaces: tuple[str, ...] = ()) -> None:
        self.owns = owns
        """(namespace, name) → whether this replica labels the view."""
        self.namespaces: tuple[str | None, ...] = namespaces or (None,)
        self.labelled = 0
        """Labels written (for tests and logs)."""
        self._stop = threading.Event()
        self._watches: list[kubernetes.watch.Watch] = []
        self._lock = threading.Lock()

    async def run(self) -> None:
        """One thread per namespace (or one for the cluster), until cancelled. Daemon threads: a watch blocks
        in a read until the server ends it, and a process stopping must not wait for that."""
        for namespace in self.namespaces:
            threading.Thread(target=self._loop, args=(namespace,), name="matview-labeler", daemon=True).start()
        try:
            await asyncio.Event().wait()
        finally:
            self.stop()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for watch in self._watches:
                watch.stop()  # type: ignore[no-untyped-call]

    def _loop(self, namespace: str | None) -> None:
        """List and label, watch and label, again; never ends but by stop (an error waits, then lists again)."""
        api = kubernetes.client.CustomObjectsApi(kube.api_client())
        backoff = ERROR_BACKOFF_SECONDS
        where = f"namespace {namespace!r}" if namespace else "the cluster"
        told_forbidden = False
        while not self._stop.is_set():
            try:
                since = self._label_listed(api, namespace)
                self._label_watched(api, namespace, since)
                backoff = ERROR_BACKOFF_SECONDS
                continue
            except ApiException as exc:
                if exc.status == 410:  # the list's version is too old to watch from: list again
                    continue
                if exc.status == 403 and namespace is None:
                    # `kopf run -m matview.k8s.main` gives the labeler no namespaces (kopf keeps its own): said
                    # once, with the fix, then retried at the longest backoff rather than logged every time.
                    if not told_forbidden:
                        told_forbidden = True
                        logger.error(
                            "cannot label the views: listing them across the cluster is forbidden (%s). Start the "
                            "operator with `matview operator --namespace NS` (as the chart does) so that it lists "
                            "only the namespaces it watches, or allow it to list materializedviews cluster-wide",
                            exc.reason,
                        )
                    backoff = MAX_ERROR_BACKOFF_SECONDS
                else:
                    logger.warning("cannot label the views of %s: %s %s", where, exc.status, exc.reason)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                logger.warning("cannot reach the Kubernetes API to label the views of %s: %s", where, exc)
            except Exception:  # a thread that dies would leave new views in no shard: log and go on
                logger.exception("labelling the views of %s failed", where)
            self._stop.wait(backoff)
            backoff = min(MAX_ERROR_BACKOFF_SECONDS, 2 * backoff)

    @staticmethod
    def _lister(api: Any, namespace: str | None) -> tuple[Callable[..., Any], tuple[str, ...]]:
        if namespace:
            return api.list_namespaced_custom_object, (GROUP, VERSION, namespace, PLURAL)
        return api.list_cluster_custom_object, (GROUP, VERSION, PLURAL)

    def _label_listed(self, api: Any, namespace: str | None) -> str:
        """Label the unlabelled views listed now, a page at a time (a first start over 10,000 views built before
        sharding would otherwise decode them all at once); the list's resourceVersion, to watch from."""
        lister, args = self._lister(api, namespace)
        page_after: str | None = None
        while True:
            listing = cast(
                dict[str, Any],
                lister(
                    *args,
                    label_selector=UNLABELLED,
                    limit=LIST_PAGE,
                    **({"_continue": page_after} if page_after else {}),
                    _request_timeout=kube.REQUEST_TIMEOUT,
                ),
            )
            for item in listing.get("items") or []:
                if self._stop.is_set():
                    return ""
                self._label(api, item)
            metadata = listing.get("metadata") or {}
            page_after = metadata.get("continue")
            if not page_after:
                return str(metadata.get("resourceVersion") or "")

    def _label_watched(self, api: Any, namespace: str | None, since: str) -> None:
        lister, args = self._lister(api, namespace)
        watch = kubernetes.watch.Watch()  # type: ignore[no-untyped-call]
        with self._lock:
            if self._stop.is_set():
                return
            self._watches.append(watch)
        try:
            for event in watch.stream(  # type: ignore[no-untyped-call]
                lister,
                *args,
                label_selector=UNLABELLED,
                resource_version=since,
                timeout_seconds=WATCH_SECONDS,
                _request_timeout=(kube.REQUEST_TIMEOUT[0], WATCH_SECONDS + 30),
            ):
                if self._stop.is_set():
                    return
                if event.get("type") == "ERROR":
                    status = event.get("raw_object") or {}
                    raise ApiException(status=status.get("code"), reason=status.get("reason"))
                if event.get("type") in ("ADDED", "MODIFIED"):
                    self._label(api, event.get("object") or {})
        finally:
            with self._lock:
                self._watches.remove(watch)

    def _label(self, api: Any, body: Mapping[str, Any]) -> None:
        metadata = body.get("metadata") or {}
        if not self.owns(str(metadata.get("namespace") or ""), str(metadata.get("name") or "")):
            return
        if _label(api, body):
            self.labelled += 1
