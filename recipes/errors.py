"""Errors of ``litepatch.recipes``. All derive from :class:`RecipeError`, a ``ValueError``, so the
``litepatch`` command prints them as one line and callers that catch ``ValueError`` keep working.
Every message names the problem and what to do about it.
"""

from __future__ import annotations

from collections.abc import Iterable


class RecipeError(ValueError):
    """Base class: a recipe could not be found, read, validated or applied."""


class RecipeValidationError(RecipeError):
    """A recipe file or object breaks the schema (unknown key, wrong type, bad value, unsafe content)."""


class RecipeNotFoundError(RecipeError):
    """No recipe under that name, path or Hub reference. ``known`` lists the names that do exist."""

    def __init__(self, message: str, *, known: Iterable[str] = ()) -> None:
        self.known = sorted(known)
        if self.known:
            message = f"{message}; known built-in recipes: {', '.join(self.known)}"
        super().__init__(message)


class FingerprintMismatchError(RecipeError):
    """The recipe was made for another model. ``differences`` lists each difference as one line."""

    def __init__(self, message: str, *, differences: Iterable[str] = ()) -> None:
        self.differences = list(differences)
        super().__init__(message)


class RecipeHubError(RecipeError):
    """The Hugging Face Hub could not be reached or refused the request (network, auth, server errors)."""
