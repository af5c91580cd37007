"""The built-in recipes shipped in ``recipes/builtin/``: their names, aliases and loading.

Example:
    >>> [b.name for b in list_builtin()][:2]
    ['demo', 'wan2.1-1.3b-480p']
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import RecipeNotFoundError
from .fingerprint import fingerprint_differences
from .io import load
from .schema import ModelFingerprint, Recipe

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"

# alias -> canonical built-in names; with several, resolve(..., fingerprint=) picks the one that fits the model.
BUILTIN_ALIASES: dict[str, tuple[str, ...]] = {
    "wan-720p": ("wan2.1-14b-720p",),
    "wan-480p": ("wan2.1-14b-480p", "wan2.1-1.3b-480p"),
}


@dataclass(frozen=True)
class BuiltinRecipe:
    """A recipe shipped with litepatch: its name, the aliases that point to it and its file."""

    name: str
    aliases: tuple[str, ...]
    path: Path

    def load(self) -> Recipe:
        return load(self.path)


def list_builtin() -> list[BuiltinRecipe]:
    """The built-in recipes, sorted by name (``litepatch recipes list`` shows them with their provenance).

    Example:
        >>> [b.name for b in list_builtin()][:2]
        ['demo', 'wan2.1-1.3b-480p']
    """
    result = []
    for path in sorted(BUILTIN_DIR.glob("*.yaml")):
        aliases = tuple(sorted(a for a, targets in BUILTIN_ALIASES.items() if path.stem in targets))
        result.append(BuiltinRecipe(path.stem, aliases, path))
    return result


def builtin_names() -> list[str]:
    """Every name that resolves to a built-in recipe: canonical names and aliases."""
    return sorted({b.name for b in list_builtin()} | set(BUILTIN_ALIASES))


def load_builtin(name: str, *, fingerprint: ModelFingerprint | None = None) -> Recipe:
    """Loads a built-in recipe by name or alias. An alias with several targets (``wan-480p``: 14B and
    1.3B) picks the one whose fingerprint fits ``fingerprint``, else the first."""
    targets = BUILTIN_ALIASES.get(name, (name,))
    if fingerprint is not None and len(targets) > 1:
        for target in targets:
            candidate = load(BUILTIN_DIR / f"{target}.yaml")
            if not fingerprint_differences(candidate, fingerprint):
                return candidate
    path = BUILTIN_DIR / f"{targets[0]}.yaml"
    if not path.is_file():
        raise RecipeNotFoundError(f"no built-in recipe named {name!r}", known=builtin_names())
    return load(path)
