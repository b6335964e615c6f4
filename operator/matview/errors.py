"""Errors that name what is wrong, so users can fix their YAML without reading code.

A ``FieldError`` always carries the field path (``spec.indexes[2].where``); a
``SpecError`` gathers all of them for one document so that one run reports every
problem at once rather than one per attempt.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldError:
    """One problem with one field of a document."""

    path: str
    """Dotted field path, e.g. ``spec.refresh.interval``."""
    message: str
    """What is wrong, in words a user can act on."""

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class MatviewError(Exception):
    """Base of every error this package raises on purpose."""


class SpecError(MatviewError):
    """A document is invalid; nothing was changed anywhere."""

    def __init__(self, errors: list[FieldError], source: str = "") -> None:
        # The first problem found for a field is the most basic one (e.g. wrong type before bad content).
        first: dict[str, FieldError] = {}
        for error in errors:
            first.setdefault(error.path, error)
        self.errors = list(first.values())
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__(prefix + "; ".join(str(e) for e in self.errors))


class UnmanagedObjectError(MatviewError):
    """An object the spec names exists but is not managed by this resource."""


class DependentObjectsError(MatviewError):
    """Other objects depend on the view in a way the engine will not silently break."""


class NoPostgresBinariesError(MatviewError):
    """An embedded server was asked for on a machine with no PostgreSQL binaries to start it with."""


class ApplyError(MatviewError):
    """The database refused a step; the message says which and why."""
