"""matview: declarative, safely refreshed, observable PostgreSQL materialized views.

The public surface is small on purpose: load and validate documents, then plan,
apply or delete them against a database. Everything else lives in private layers
(catalog observation, pure planning, execution) that the CLI and the Kubernetes
operator share.
"""

from matview.api.spec import MaterializedView
from matview.api.validation import load_documents, load_file, validate_document
from matview.errors import FieldError, SpecError, UnmanagedObjectError
from matview.plan.engine import ApplyResult, apply, delete, plan

__all__ = [
    "ApplyResult",
    "FieldError",
    "MaterializedView",
    "SpecError",
    "UnmanagedObjectError",
    "apply",
    "delete",
    "load_documents",
    "load_file",
    "plan",
    "validate_document",
]
