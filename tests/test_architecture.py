"""The package's dependency rule, read from the imports of every module (also those inside functions)."""

import ast
from pathlib import Path

import pytest


PACKAGE = Path(__file__).parents[1] / "modeling_matpac"
# The Hugging Face model unit: what a checkpoint needs, and what remote code copies next to the weights.
MODEL_UNIT = {
    "__init__", "configuration_matpac", "feature_extraction_matpac", "modeling_matpac", "audio", "convert",
    "conversion_card", "labels",
}  # fmt: skip
SCRIPT_SUPPORT = {"cpu_memory", "script_exit"}  # what only the scripts, which own their process, do to it
SHARED = {"atomic_write"}  # what pretraining/ and evaluation/ both use, outside the model unit
REMOTE_CODE = {"configuration_matpac", "feature_extraction_matpac", "modeling_matpac", "audio"}
AREAS = ("pretraining", "evaluation")
DATA = ("label_maps",)  # package data of the converter, no code


def module_name(path: Path) -> str:
    parts = ("modeling_matpac", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, relative imports resolved to absolute names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    imports = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            imports.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            imports.add(module)
            imports.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import x`
    return imports


MODULES = sorted(PACKAGE.rglob("*.py"))


def area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in AREAS else "model unit"


def test_the_layout_is_the_documented_one():
    top_level = {path.stem for path in PACKAGE.glob("*.py")}
    assert top_level == MODEL_UNIT | SCRIPT_SUPPORT | SHARED
    directories = {path.name for path in PACKAGE.iterdir() if path.is_dir() and path.name != "__pycache__"}
    assert directories == {*AREAS, *DATA}
    assert not list((PACKAGE / "label_maps").glob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda path: module_name(path))
def test_dependency_rule(path):
    """The model unit imports nothing from pretraining/ or evaluation/; those two never import each other."""
    own_area = area(module_name(path))
    ours = {module for module in imported_modules(path) if module.split(".")[0] == "modeling_matpac"}
    forbidden = set(AREAS) - {own_area}
    offending = sorted(module for module in ours if area(module) in forbidden)
    assert not offending, f"{module_name(path)} ({own_area}) imports {offending}"


@pytest.mark.parametrize("stem", sorted(REMOTE_CODE))
def test_remote_code_files_import_only_each_other_by_single_level_relative_imports(stem):
    """What `save_pretrained` copies must work flattened next to the weights, without the package installed."""
    tree = ast.parse((PACKAGE / f"{stem}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.level == 1 and node.module in REMOTE_CODE, ast.unparse(node)
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module]
        assert not any(name.split(".")[0] == "modeling_matpac" for name in names), ast.unparse(node)


@pytest.mark.parametrize("path", MODULES, ids=lambda path: module_name(path))
def test_the_library_leaves_the_process_alone(path):
    """`cpu_memory` changes the allocator, `script_exit` closes every bar and kills the workers: scripts only."""
    assert not {f"modeling_matpac.{stem}" for stem in SCRIPT_SUPPORT} & imported_modules(path)
