"""matview: declarative, safely refreshed, observable PostgreSQL materialized views.

The public surface is small on purpose: load and validate documents, then plan,
apply or delete them against a database. Everything else lives in private layers
(catalog observation, pure planning, execution) that the CLI and the Kubernetes
operator share. The names below are loaded on first use, so that an application
importing only ``matview.client`` loads psycopg and nothing of the operator.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matview.api.spec import MaterializedView
    from matview.api.validation import load_documents, load_file, validate_document
    from matview.errors import FieldError, SpecError, UnmanagedObjectError
    from matview.plan.engine import ApplyResult, apply, delete, plan

_WHERE = {
    "MaterializedView": "matview.api.spec",
    "load_documents": "matview.api.validation",
    "load_file": "matview.api.validation",
    "validate_document": "matview.api.validation",
    "FieldError": "matview.errors",
    "SpecError": "matview.errors",
    "UnmanagedObjectError": "matview.errors",
    "ApplyResult": "matview.plan.engine",
    "apply": "matview.plan.engine",
    "delete": "matview.plan.engine",
    "plan": "matview.plan.engine",
}

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


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'matview' has no attribute {name!r}")
