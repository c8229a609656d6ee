"""Imports go one way (docs/DESIGN.md): every import of every `scldm_hf` module, read with `ast` (function-level
imports included), goes to the same layer or a lower one."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "scldm_hf"

# module prefix -> layer, lowest first; the longest matching prefix decides
LAYERS = {
    "scldm_hf": 0,  # the package root: lazy exports only
    "scldm_hf.errors": 0,
    "scldm_hf.lazy_exports": 0,
    "scldm_hf.hub_code": 0,  # flattens module sources for saved folders; imports nothing of the package
    "scldm_hf.resources": 0,
    "scldm_hf.version": 0,  # the installed version (standard library only; ships with pipeline code)
    "scldm_hf.validation": 1,
    "scldm_hf.data": 2,
    "scldm_hf.models": 3,
    "scldm_hf.flow_matching": 3,
    "scldm_hf.pipelines": 4,
    "scldm_hf.loading": 4,
    "scldm_hf.conversion": 4,  # original scLDM checkpoints -> our models and pipeline
    "scldm_hf.training": 5,
    "scldm_hf.evaluation": 6,
    "scldm_hf.workflows": 7,
    "scldm_hf.cli": 8,
    "scldm_hf.demo": 8,
}


def layer(module: str) -> int:
    prefixes = [prefix for prefix in LAYERS
                if module == prefix or (prefix != "scldm_hf" and module.startswith(prefix + "."))]
    assert prefixes, f"{module} has no layer: add it to LAYERS"
    return LAYERS[max(prefixes, key=len)]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, module: str) -> set[str]:
    """`scldm_hf` modules imported anywhere in `path` (relative imports resolved against `module`)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(part for part in (base, node.module) if part)
            imported.add(target)
    return {name for name in imported if name == "scldm_hf" or name.startswith("scldm_hf.")}


def test_no_module_imports_a_higher_layer():
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    upward = {
        (module, target)
        for module, path in modules.items()
        for target in imported_modules(path, module)
        if layer(target) > layer(module)
    }
    assert not upward, f"imports from a lower layer to a higher one: {sorted(upward)}"
    assert layer("scldm_hf.training.dit") < layer("scldm_hf.evaluation") < layer("scldm_hf.workflows.side_by_side")
