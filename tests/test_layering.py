"""The layers of docs/architecture.md, read off the import graph with `ast`: every import of a
project module runs downwards (or within its layer), and every import inside a function says in
a comment why it is late."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PROJECT_PACKAGES = ("coyo_vit", "input_pipeline", "checkpoints", "configs", "benchmarks")
SCRIPTS = ("train", "finetune", "evaluate")

# Lowest first. A module belongs to the first layer with a matching prefix, from the most
# specific prefix down.
LAYERS = {
    "core": 0,        # the model, class lists and names, the config-key check
    "data": 1,        # input_pipeline (per-step data path, demo data) and checkpoints
    "runtime": 2,     # coyo_vit.training: loop, step, sharding, evaluators, logging
    "top": 3,         # the scripts, the tools, configs and benchmarks
}
PREFIXES = (
    ("coyo_vit.training", "runtime"),
    ("coyo_vit.tools", "top"),
    ("input_pipeline.tools", "top"),
    ("coyo_vit", "core"),
    ("input_pipeline", "data"),
    ("checkpoints", "data"),
    ("configs", "top"),
    ("benchmarks", "top"),
    *((script, "top") for script in SCRIPTS),
)


def layer_of(module: str) -> str:
    for prefix, layer in PREFIXES:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    raise KeyError(module)


def project_modules() -> dict[str, Path]:
    modules = {script: REPO / f"{script}.py" for script in SCRIPTS}
    for package in PROJECT_PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def project_imports(path: Path, module: str):
    """(imported module, line, is late) for every import of a project module in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = set(map(id, tree.body))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PROJECT_PACKAGES + SCRIPTS:
                yield name, node.lineno, id(node) not in top_level


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an imported name lives in (`from pkg import name` may name either)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_every_import_runs_downwards_or_within_its_layer():
    modules = project_modules()
    upwards = []
    for module, path in modules.items():
        mine = LAYERS[layer_of(module)]
        for name, line, _ in project_imports(path, module):
            target = resolve(name, modules)
            if target is not None and LAYERS[layer_of(target)] > mine:
                upwards.append(f"{path.relative_to(REPO)}:{line} ({layer_of(module)}) imports "
                               f"{target} ({layer_of(target)})")
    assert not upwards, "imports that run upwards:\n" + "\n".join(upwards)


def test_every_late_import_says_why():
    missing = []
    for module, path in project_modules().items():
        lines = path.read_text().splitlines()
        for _, line, late in project_imports(path, module):
            here, above = lines[line - 1], lines[line - 2] if line > 1 else ""
            if late and "#" not in here and not above.strip().startswith("#"):
                missing.append(f"{path.relative_to(REPO)}:{line}: {here.strip()}")
    assert not missing, "imports inside functions without a comment saying why:\n" + "\n".join(
        sorted(set(missing)))


@pytest.mark.parametrize("module, layer", [
    ("coyo_vit.models.vit", "core"), ("coyo_vit.class_names", "core"),
    ("input_pipeline.pipeline", "data"), ("input_pipeline.demo.shards", "data"),
    ("checkpoints.load", "data"), ("coyo_vit.training.loop", "runtime"),
    ("coyo_vit.training.evaluators.holdout", "runtime"), ("coyo_vit.tools.sweep", "top"),
    ("input_pipeline.tools.stats", "top"), ("train", "top")])
def test_layers_follow_the_folders(module, layer):
    assert layer_of(module) == layer
    assert module in project_modules()


def test_the_check_sees_an_upward_import(tmp_path):
    # A test that cannot fail is no test: an input_pipeline module importing the loop is caught.
    bad = tmp_path / "bad.py"
    bad.write_text("from coyo_vit.training import loop\n")
    found = list(project_imports(bad, "input_pipeline.bad"))
    assert found and LAYERS[layer_of(resolve(found[0][0], project_modules()))] > LAYERS["data"]
