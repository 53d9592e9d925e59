"""The import graph of `mme/` points one way: no cycle between subpackages, no import of a higher layer.

Every `import` / `from ... import` of every module under mme/ is read with `ast` (function-level imports
included: a lazy import is still a dependency). docs/architecture.md explains the layers.
"""

from __future__ import annotations

from pathlib import Path

import importgraph

MME = importgraph.MME

# Top to bottom; a unit may import its own layer's units (without a cycle) and any layer below.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__main__", "cli"),
    ("stages",),
    ("reports",),
    ("ablation",),
    ("engine",),
    ("datasets",),
    ("models", "targets"),
    ("motion",),
    ("data",),
    ("config", "presets", "paths", "utils"),
)
LAYER_OF = {unit: depth for depth, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str | None:
    """`mme.data.lists` -> `data`; `mme` itself (the package docstring) -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "mme" and len(parts) > 1 else None


def module_name(path: Path) -> str:
    return importgraph.module_name(path, MME)


def imports(path: Path) -> set[str]:
    """Absolute names of the mme modules a file imports (relative imports resolved)."""
    return importgraph.imports(path, MME)


def unit_graph() -> dict[str, dict[str, list[str]]]:
    """importing unit -> imported unit -> the modules that make the edge."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted(MME.rglob("*.py")):
        source = unit_of(module_name(path))
        for target in map(unit_of, imports(path)):
            if source and target and target != source:
                graph.setdefault(source, {}).setdefault(target, []).append(module_name(path))
    return graph


def test_every_unit_has_a_layer():
    units = {unit_of(module_name(p)) for p in MME.rglob("*.py")} - {None}
    assert units <= set(LAYER_OF), f"add {sorted(units - set(LAYER_OF))} to LAYERS (and docs/architecture.md)"


def test_no_import_points_up():
    upward = [f"{module} imports mme.{target} ({source} is below {target})"
              for source, targets in unit_graph().items() for target, modules in targets.items()
              for module in modules if LAYER_OF[target] < LAYER_OF[source]]
    assert not upward, "\n".join(upward)


def test_no_cycle_between_subpackages():
    graph = {source: set(targets) for source, targets in unit_graph().items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(unit: str, path: list[str]) -> list[str] | None:
        state[unit] = 1
        for nxt in sorted(graph.get(unit, ())):
            if state.get(nxt) == 1:
                return path + [unit, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [unit])):
                return cycle
        state[unit] = 2
        return None

    for unit in sorted(graph):
        if unit not in state:
            cycle = visit(unit, [])
            assert cycle is None, "import cycle: " + " -> ".join(cycle[cycle.index(cycle[-1]):])


def test_the_checker_sees_an_upward_import(tmp_path):
    """The parser resolves lazy and relative imports (a broken checker would pass everything)."""
    fake = tmp_path / "mme" / "data" / "x.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from ..stages import pretrain\n    import mme.engine.fit\n")
    global MME
    real, MME = MME, tmp_path / "mme"
    try:
        assert imports(fake) == {"mme.stages", "mme.engine.fit"}
    finally:
        MME = real
