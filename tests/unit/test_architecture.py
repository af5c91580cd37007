"""The house (DESIGN §2): every arrow between rooms points down, and every cross-room import is absolute.

Rooms, top to bottom: the front doors (the ``litepatch`` package's lazy names, ``litepatch.cli``,
``litepatch.demo``), ``calibration``, the patcher (the other ``litepatch.*`` modules), ``recipes``,
``kernels``. ``litepatch.version`` is the nameplate: it imports nothing and anyone may read it.

Two checks: a static one over every ``import``/``from`` statement (function-level ones included, which
an import alone never runs), and a dynamic one that imports each room in a fresh interpreter while the
rooms above it are unimportable.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"kernels": "litepatch.kernels", "recipes": "litepatch.recipes", "calibration": "litepatch.calibration",
           "litepatch": "litepatch"}
ROOMS = ("front", "calibration", "patcher", "recipes", "kernels")  # top to bottom
NAMEPLATE = "litepatch.version"


def room_of(module: str) -> str | None:
    """The room of a ``litepatch`` module name; ``None`` for other packages and the nameplate."""
    if module == NAMEPLATE or not (module == "litepatch" or module.startswith("litepatch.")):
        return None
    for room in ("kernels", "recipes", "calibration"):
        if module == f"litepatch.{room}" or module.startswith(f"litepatch.{room}."):
            return room
    if module in ("litepatch", "litepatch.cli") or module.startswith("litepatch.demo"):
        return "front"
    return "patcher"


def source_modules() -> dict[str, Path]:
    """Every module of the package, by its installed name (``kernels/state.py`` is ``litepatch.kernels.state``)."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node except the bodies of ``if TYPE_CHECKING:`` (imports for annotations only, never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, bool, int]]:
    """(imported module, written relative, line) for every import statement of ``path``."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = []
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(alias.name, False, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub if sub in known else base, bool(node.level), node.lineno))
    return out


def test_every_arrow_points_down_and_every_cross_room_import_is_absolute():
    modules = source_modules()
    known = set(modules)
    wrong = []
    for module, path in sorted(modules.items()):
        here = room_of(module)
        for target, relative, line in imports_of(module, path, known):
            there = room_of(target)
            if there is None or there == here:
                continue
            where = f"{path.relative_to(ROOT)}:{line} ({here} -> {there}: {target})"
            if ROOMS.index(there) < ROOMS.index(here):
                wrong.append(f"arrow up: {where}")
            if relative:
                wrong.append(f"relative cross-room import: {where}")
    assert not wrong, "\n".join(wrong)


# A fresh interpreter: the modules of the rooms above are refused by a finder in front of every other; each module of the room
# is imported; a module that needs a missing optional package (triton, cutlass, diffusers) is reported apart.
_PROBE = r"""
import importlib, importlib.abc, json, sys

blocked, modules = json.loads(sys.argv[1])
room_of = {room_of_source}

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "litepatch" and room_of(name) in blocked:  # the package itself: every room's parent
            raise ImportError(f"blocked room: {{name}}", name=name)
        return None

sys.meta_path.insert(0, Refuse())
result = {{"failed": {{}}, "optional": {{}}}}
for module in modules:
    try:
        importlib.import_module(module)
    except ImportError as err:
        mine = str(err).startswith("blocked room") or (err.name or "").startswith("litepatch")
        result["failed" if mine else "optional"][module] = f"{{type(err).__name__}}: {{err}}"
print(json.dumps(result))
"""


@pytest.mark.parametrize("room", ROOMS)
def test_each_room_imports_with_the_rooms_above_it_unimportable(room, tmp_path):
    import inspect

    above = ROOMS[: ROOMS.index(room)]
    modules = sorted(m for m in source_modules() if room_of(m) == room)
    room_source = inspect.getsource(room_of).replace("NAMEPLATE", repr(NAMEPLATE))
    code = room_source + "\n" + _PROBE.format(room_of_source="room_of")
    # cwd outside the repository: its root folder `kernels/` would otherwise be a top-level package
    done = subprocess.run([sys.executable, "-c", code, json.dumps([above, modules])], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["failed"] == {}, f"{room} reaches a room above it ({', '.join(above)}): {result['failed']}"
    assert len(result["optional"]) < len(modules), f"no module of {room} imported: {result['optional']}"


def test_no_import_circles():
    # every import statement counts, function-level ones too: a circle broken by a late import is still a circle
    modules = source_modules()
    known = set(modules)
    graph = {m: {t for t, _, _ in imports_of(m, p, known) if t in known and t != m} for m, p in modules.items()}
    circles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "\n".join(circles)
