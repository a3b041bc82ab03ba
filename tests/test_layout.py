"""The package's floors: each module imports only from its own floor or the floors below it, and
no import cycle exists (module-level and function-level imports alike, read from the source).

The floors, top to bottom, are DESIGN.md's; a new module must be given one here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "trt_sdxl"

FLOORS = [  # bottom first
    ("errors", "files", "log", "components", "configs", "reference", "version"),
    ("unet_config", "shapes", "tokenizer", "weighting", "png", "schedulers", "kernels"),
    ("backend", "keymap"),
    ("dtypes", "weights", "netexec", "lora"),
    ("quant", "engines"),
    ("support", "fusion_lint"),
    ("layers",),
    ("models", "refit_map"),
    ("executors", "denoising", "runtime", "lora_switch"),
    ("pipeline", "calibration"),
    ("generator",),
    ("triton",),
    ("build", "generate", "serve", "export", "refit", "__init__"),
]
FLOOR = {name: level for level, names in enumerate(FLOORS) for name in names}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit(module: str) -> str:
    """The floor unit of a module: its top-level name under trt_sdxl (a subpackage counts as one)."""
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def imports(path: Path) -> set[str]:
    """trt_sdxl modules `path` imports, anywhere in the file."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("trt_sdxl")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("trt_sdxl"):
                continue
            for alias in node.names:  # `from . import layers` imports the module trt_sdxl.layers
                sub = f"{target}.{alias.name}"
                found.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists()
                          or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else target)
    return found - {module}


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {m: imports(p) for m, p in MODULES.items()}


def test_every_module_has_a_floor():
    missing = sorted({unit(m) for m in MODULES} - FLOOR.keys())
    assert not missing, f"give these modules a floor in tests/test_layout.py: {missing}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_or_sideways_only(module):
    mine = FLOOR[unit(module)]
    upward = sorted(t for t in GRAPH[module] if unit(t) != unit(module) and FLOOR[unit(t)] > mine)
    assert not upward, (f"{module} (floor {mine}) imports from higher floors: "
                        + ", ".join(f"{t} (floor {FLOOR[unit(t)]})" for t in upward))


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(GRAPH.get(m, ())):
            if t not in MODULES:
                continue
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def test_the_walk_sees_imports():
    """The checker itself: it finds a known function-level import and a known relative one."""
    assert "trt_sdxl.engines" in GRAPH["trt_sdxl.runtime.engine"]  # inside Engine.from_network
    assert "trt_sdxl.quant.recipe" in GRAPH["trt_sdxl.layers"]
