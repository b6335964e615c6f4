"""Turning a kopf body into the validated spec and its database connection string."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from matview import timestamps
from matview.k8s import conditions, kube
from matview.k8s.credentials import CredentialsError, dsn_from_secret
from matview.spec import MaterializedView
from matview.validation import validate_document


def document(body: Mapping[str, Any]) -> dict[str, Any]:
    """A plain copy of the object as the validator reads it (status is the operator's own, left out)."""
    plain = {key: copy.deepcopy(value) for key, value in body.items() if key != "status"}
    plain["apiVersion"] = plain.get("apiVersion") or "matview.dev/v1alpha1"
    plain["kind"] = plain.get("kind") or "MaterializedView"
    return plain


def view_of(body: Mapping[str, Any]) -> MaterializedView:
    """Validate the object; raises SpecError naming each bad field."""
    return validate_document(document(body))


#: The ClusterRole (manifests/core/rbac.yaml) that grants reading Secrets, bound per namespace of views.
SECRETS_CLUSTER_ROLE = "matview-operator-secrets"


async def resolve_dsn(view: MaterializedView) -> str:
    """The DSN from the Secret named by spec.database.secretRef, in the resource's own namespace."""
    if view.secret_ref is None:
        raise CredentialsError(
            conditions.INVALID_SPEC, "spec.database.secretRef is required when running in Kubernetes"
        )
    try:
        data = await kube.read_secret(view.namespace, view.secret_ref.name)
    except kube.SecretForbiddenError:
        raise CredentialsError(
            conditions.SECRET_FORBIDDEN,
            f"the operator may not read Secrets in namespace {view.namespace!r}: bind the ClusterRole "
            f"{SECRETS_CLUSTER_ROLE} there (kubectl -n {view.namespace} create rolebinding {SECRETS_CLUSTER_ROLE} "
            f"--clusterrole={SECRETS_CLUSTER_ROLE} --serviceaccount=<operator namespace>:matview-operator)",
        ) from None
    if data is None:
        raise CredentialsError(
            conditions.SECRET_NOT_FOUND, f"Secret {view.secret_ref.name!r} not found in namespace {view.namespace!r}"
        )
    return dsn_from_secret(view.secret_ref.name, data, view.secret_ref.key)


parse_time = timestamps.parse
