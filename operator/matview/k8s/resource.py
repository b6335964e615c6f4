"""Turning a kopf body into the validated spec and its database connection string."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from matview import timestamps
from matview.api.spec import MaterializedView
from matview.api.validation import validate_document
from matview.constants import API_VERSION, KIND
from matview.errors import SpecError
from matview.k8s import conditions, kube
from matview.k8s.credentials import CredentialsError, dsn_from_secret


def document(body: Mapping[str, Any]) -> dict[str, Any]:
    """A plain copy of the object as the validator reads it (status is the operator's own, left out)."""
    plain = {key: copy.deepcopy(value) for key, value in body.items() if key != "status"}
    plain["apiVersion"] = plain.get("apiVersion") or API_VERSION
    plain["kind"] = plain.get("kind") or KIND
    return plain


#: Validated specs (or their SpecError) by digest of what validation reads; bounded, oldest dropped first.
_VALIDATED: OrderedDict[str, MaterializedView | SpecError] = OrderedDict()
_VALIDATED_MAX = 20_000
_VALIDATED_LOCK = threading.Lock()


def view_of(body: Mapping[str, Any]) -> MaterializedView:
    """Validate the object; raises SpecError naming each bad field."""
    return _view_of_document(document(body))


def _view_of_document(plain: dict[str, Any]) -> MaterializedView:
    """Handlers and daemons ask for every resource again and again; validation (the SQL parse above all)
    runs once per distinct spec, so a large or hostile query costs its parse once, not on every poll,
    and never crowds the parser thread that other resources need."""
    metadata = plain.get("metadata") or {}
    essence = [
        plain.get("apiVersion"),
        plain.get("kind"),
        metadata.get("name"),
        metadata.get("namespace"),
        metadata.get("generation"),
        plain.get("spec"),
    ]
    key = hashlib.sha256(json.dumps(essence, sort_keys=True, default=str).encode()).hexdigest()
    with _VALIDATED_LOCK:
        known = _VALIDATED.get(key)
        if known is not None:
            _VALIDATED.move_to_end(key)
    if known is None:
        try:
            known = validate_document(plain)
        except SpecError as exc:
            known = exc
        with _VALIDATED_LOCK:
            _VALIDATED[key] = known
            while len(_VALIDATED) > _VALIDATED_MAX:
                _VALIDATED.popitem(last=False)
    if isinstance(known, SpecError):
        raise known
    return known


async def validated(body: Mapping[str, Any]) -> MaterializedView:
    """view_of for handlers: a spec not validated before is checked on a worker thread, so parsing a large
    query never stalls the event loop that every other resource's handlers share."""
    return await asyncio.to_thread(_view_of_document, document(body))  # copied here: body is the loop's


#: The ClusterRole (manifests/core/rbac.yaml) that grants reading Secrets, bound per namespace of views.
SECRETS_CLUSTER_ROLE = "matview-operator-secrets"


async def resolve_dsn(view: MaterializedView, max_age_seconds: float = kube.SECRET_MAX_AGE_SECONDS) -> str:
    """The DSN from the Secret named by spec.database.secretRef, in the resource's own namespace (a copy
    read less than max_age_seconds ago is reused)."""
    if view.secret_ref is None:
        raise CredentialsError(
            conditions.Reason.INVALID_SPEC, "spec.database.secretRef is required when running in Kubernetes"
        )
    try:
        data = await kube.read_secret(view.namespace, view.secret_ref.name, max_age_seconds)
    except kube.ApiUnreachableError as exc:
        raise CredentialsError(
            conditions.Reason.API_UNREACHABLE, f"the Kubernetes API is unreachable, Secret not read yet: {exc}"
        ) from None
    except kube.SecretForbiddenError:
        raise CredentialsError(
            conditions.Reason.SECRET_FORBIDDEN,
            f"the operator may not read Secrets in namespace {view.namespace!r}: bind the ClusterRole "
            f"{SECRETS_CLUSTER_ROLE} there (kubectl -n {view.namespace} create rolebinding {SECRETS_CLUSTER_ROLE} "
            f"--clusterrole={SECRETS_CLUSTER_ROLE} --serviceaccount=<operator namespace>:matview-operator)",
        ) from None
    if data is None:
        raise CredentialsError(
            conditions.Reason.SECRET_NOT_FOUND,
            f"Secret {view.secret_ref.name!r} not found in namespace {view.namespace!r}",
        )
    return dsn_from_secret(view.secret_ref.name, data, view.secret_ref.key)


parse_time = timestamps.parse
