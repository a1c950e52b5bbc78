"""The package's import order: each stage imports only the stages below it, and nothing
imports in a circle. Every import counts, including those inside functions: a lazy import
is still a dependency."""

import ast
from pathlib import Path

import pytest

import lora_deploy

ROOT = Path(lora_deploy.__file__).parent
# Lowest first. Shared modules (errors, util, ...) sit below every stage.
STAGES = [
    "io",
    "adapter",
    "merge",
    "modeling",
    "backends",
    "export",
    "proof",
    "bench",
    "pipeline",
    "examples",
    "cli",
    "__main__",
]
# _native: the optional compiled kernels (C extensions) and their loader, below everything.
SHARED = {"__init__", "errors", "util", "arrays", "dtypes", "compare", "progress", "options", "_native"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def stage(module: str) -> int:
    """-1 for the shared modules, else the stage's position."""
    parts = module.split(".")
    first = parts[1] if len(parts) > 1 else "__init__"
    return -1 if first in SHARED else STAGES.index(first)


def imports(module: str) -> set[str]:
    """The lora_deploy modules `module` imports (a name imported from a package counts as
    its submodule when there is one)."""
    tree = ast.parse(MODULES[module].read_text())
    found = set()
    for node in runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lora_deploy")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lora_deploy"):
            assert node.level == 0, f"{module}: relative import (one import style: absolute)"
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return {m for m in found if m in MODULES and m != module}


def runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (annotations only, never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            continue
        yield node
        yield from runtime_nodes(node)


GRAPH = {m: imports(m) for m in MODULES}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    upward = [m for m in GRAPH[module] if stage(m) > stage(module)]
    assert not upward, f"{module} (stage {stage(module)}) imports from a higher stage: {upward}"


def test_shared_modules_import_only_shared_ones():
    for module in MODULES:
        if stage(module) == -1 and module != "lora_deploy":
            assert all(stage(m) == -1 for m in GRAPH[module]), (module, GRAPH[module])


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(GRAPH[module]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep) :] + [module, dep]))
            if dep not in state:
                visit(dep, path + [module])
        state[module] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [])


def test_every_stage_is_a_package():
    for name in STAGES[:-2]:  # cli and __main__ (the console script's entry) are modules
        assert (ROOT / name / "__init__.py").is_file(), name


def test_the_graph_sees_imports_inside_functions():
    """Guard against a parser that only reads module-level imports."""
    assert "lora_deploy.examples.demo" in GRAPH["lora_deploy.cli"]
