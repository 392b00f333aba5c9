"""Imports go down (STYLE.md): what a Ray worker loads never reaches the
tracer or the builder, the running Pipeline never reaches the compiler,
and builder -> step -> trace point one way.

Read from the source with `ast`, so that an import inside a function or
under `if TYPE_CHECKING:` counts too: either would tie the modules again.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FRONT_END = {"pipeline_ir.trace", "pipeline_ir.builder", "pipeline_ir.step", "pipeline_ir.compile"}


def _modules() -> dict[str, Path]:
    found = {}
    for base, package in ((ROOT / "pipeline_ir", "pipeline_ir"), (ROOT / "backends", "pipeline_ir.backends")):
        for path in base.rglob("*.py"):
            parts = path.relative_to(base).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = _modules()


def imports_of(module: str) -> set[str]:
    """The pipeline_ir modules `module` imports, anywhere in its file."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pipeline_ir.ir import graph` imports a module; `from x import Name` its module.
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names]
        else:
            continue
        out.update(n for n in names if n in MODULES and n != module)
    return out


def reach(module: str) -> set[str]:
    """Every module `module` imports, directly or not (package __init__
    files excluded: they re-export, and Python runs them on any import)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        for dep in imports_of(todo.pop()):
            if dep not in seen and not MODULES[dep].name == "__init__.py":
                seen.add(dep)
                todo.append(dep)
    return seen


def test_the_module_map_covers_the_package() -> None:
    assert {"pipeline_ir.bindings", "pipeline_ir.backends.worker", "pipeline_ir.trace", "pipeline_ir.ir.graph"} <= set(MODULES)
    assert "pipeline_ir.bindings" in imports_of("pipeline_ir.backends.worker")


def test_backends_never_reach_the_front_end() -> None:
    for module in MODULES:
        if module.startswith("pipeline_ir.backends") or module == "pipeline_ir.bindings":
            assert not reach(module) & FRONT_END, module


def test_pipeline_does_not_import_the_compiler() -> None:
    assert not reach("pipeline_ir.pipeline") & FRONT_END


def test_builder_step_trace_point_one_way() -> None:
    assert imports_of("pipeline_ir.builder") & {"pipeline_ir.step", "pipeline_ir.trace"} == set()
    assert imports_of("pipeline_ir.step") & {"pipeline_ir.trace", "pipeline_ir.compile"} == set()
    assert {"pipeline_ir.builder", "pipeline_ir.step"} <= imports_of("pipeline_ir.trace")
