"""How the tests read `mme/`'s imports: every `import` / `from ... import` of a file, parsed with `ast`.

Function-level (lazy) imports are included: a lazy import is still a dependency. Shared by the layer
test (which units import which) and the dvc.yaml test (which files a stage's result depends on).
"""

from __future__ import annotations

import ast
from pathlib import Path

MME = Path(__file__).resolve().parents[1] / "mme"


def module_name(path: Path, root: Path = MME) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = MME, submodules: bool = False) -> set[str]:
    """Absolute names of the mme modules a file imports (relative imports resolved).

    With `submodules`, `from mme.engine import fit` also yields `mme.engine.fit` when that is a module
    under `root` (the plain form yields only the package it is taken from)."""
    name = module_name(path, root)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            if submodules:
                found |= {f"{base}.{alias.name}" for alias in node.names
                          if module_path(f"{base}.{alias.name}", root) is not None}
    return {name for name in found if name == "mme" or name.startswith("mme.")}


def module_path(name: str, root: Path = MME) -> Path | None:
    """The file of module `name` (`mme.engine` -> mme/engine/__init__.py), None if it is not a module."""
    base = root.parent.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def closure(module: str, root: Path = MME) -> set[Path]:
    """Every file under `root` that importing `module` executes: its imports, followed transitively
    (lazy ones included), plus the `__init__.py` of every package on the way."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, then c
            path = module_path(".".join(parts[:depth]), root)
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(imports(path, root, submodules=True))
    return seen
