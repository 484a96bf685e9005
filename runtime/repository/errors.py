"""The repository's error types (no dependencies)."""

from __future__ import annotations


class RepositoryError(RuntimeError):
    """A model, tier or profile is missing or unusable; the message says how to fix it."""


class ModelNotFound(RepositoryError):
    """No model of that name in the repository."""


class InvalidModelName(RepositoryError):
    """A model name that is not one plain directory name inside the repository."""
