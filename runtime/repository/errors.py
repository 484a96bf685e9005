"""The repository's one error type (no dependencies)."""

from __future__ import annotations


class RepositoryError(RuntimeError):
    """A model, tier or profile is missing or unusable; the message says how to fix it."""
