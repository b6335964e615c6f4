"""Names shared by every layer: one prefix, ``matview.dev``, for everything we own.

The API group, the finalizer, annotations, kopf's storages and the ownership
marker written into database comments all derive from it, so a cluster admin or
a DBA can find every trace of the product by one string.
"""

from typing import Final

PREFIX: Final = "matview.dev"
GROUP: Final = PREFIX
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "MaterializedView"
PLURAL: Final = "materializedviews"

FINALIZER: Final = f"{PREFIX}/finalizer"
REFRESH_REQUESTED_ANNOTATION: Final = f"{PREFIX}/refresh-requested-at"
#: The label that places a view in one of the shards' buckets (see ``k8s.sharding``).
BUCKET_LABEL: Final = f"{PREFIX}/bucket"

#: The key of the JSON object written as COMMENT on every object we create.
MARKER_KEY: Final = "managedBy"
MARKER_VALUE: Final = PREFIX

APPLICATION_NAME: Final = "matview-operator"

#: PostgreSQL's NAMEDATALEN - 1: longer identifiers are silently truncated by the server.
MAX_IDENTIFIER_BYTES: Final = 63

#: The namespace standalone documents belong to when their metadata names none.
DEFAULT_NAMESPACE: Final = "default"

#: Where /metrics is served unless told otherwise (the Helm chart and the manifests scrape this port).
DEFAULT_METRICS_PORT: Final = 9808
