"""The package's folders are its layers (docs/architecture.md): an import may only point
down. The rules are read from every `import` in the source, lazy and TYPE_CHECKING ones
included, so a forbidden edge fails here before anyone notices a circle."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "moa"
MODEL = ("attention", "kernels", "layers", "models")
# (the importing layer, the layers it must not import, why)
RULES = [
    (MODEL, ("training", "data", "hf", "dashboard", "entry"),
     "model code travels alone: no training, data, Hugging Face or dashboard code"),
    (("kernels",), ("attention", "layers", "models"),
     "kernels sit below the modules that use them"),
    (("data",), (*MODEL, "training", "hf", "dashboard", "entry"),
     "data knows no model and no training"),
    (("dashboard",), (*MODEL, "data", "training", "hf", "entry"),
     "the dashboard reads run directories only"),
    (("training",), ("hf", "dashboard", "entry"),
     "training sits below the Hugging Face layer (no training <-> hf circle)"),
    ((*MODEL, "kernels", "data", "training", "dashboard", "root"), ("facade",),
     "`import moa` loads the model and the Hugging Face registration: import the module"),
    (("root",), ("training", "data", "hf", "dashboard", "entry"),
     "config, schema, registry and errors sit under everything"),
]
FOLDERS = {*MODEL, "data", "training", "hf", "dashboard"}
ROOT = {"config", "schema", "registry", "errors"}
ENTRY = {"params", "export", "chat"}  # python -m moa.params / moa.export / moa.chat


def layer_of(module: str) -> str:
    """The layer of a dotted module name inside `moa` ("moa.layers.router" -> "layers")."""
    parts = module.split(".")
    if len(parts) == 1:
        return "facade"  # moa/__init__.py: the public names, from every layer
    if parts[1] in FOLDERS:
        return parts[1]
    if parts[1] in ROOT:
        return "root"
    if parts[1] in ENTRY:
        return "entry"
    raise AssertionError(f"{module} belongs to no layer: add it to tests/test_layers.py "
                         "and docs/architecture.md")


def module_name(path: Path, package: Path) -> str:
    relative = path.relative_to(package.parent).with_suffix("")
    parts = list(relative.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, package: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every moa import in the file, relative ones resolved."""
    name = module_name(path, package)
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join([*anchor, base] if base else anchor)
            # `from moa.layers import router` imports the submodule moa.layers.router
            found += [(node.lineno, _submodule(f"{base}.{alias.name}", package) or base)
                      for alias in node.names]
    return [(line, module) for line, module in found
            if module == "moa" or module.startswith("moa.")]


def _submodule(module: str, package: Path) -> str | None:
    """`module` if it names a module or package of `package`, else None (a name in it)."""
    path = package.parent.joinpath(*module.split("."))
    return module if path.with_suffix(".py").is_file() or path.is_dir() else None


def forbidden_edges(package: Path = PACKAGE) -> list[str]:
    edges = []
    for path in sorted(package.rglob("*.py")):
        source = layer_of(module_name(path, package))
        for line, target in imported_modules(path, package):
            target_layer = layer_of(target)
            for importers, banned, why in RULES:
                if source in importers and target_layer in banned:
                    edges.append(f"{path.relative_to(package.parent)}:{line} imports "
                                 f"{target} ({source} -> {target_layer}): {why}")
    return edges


def test_no_module_imports_a_layer_above_it():
    assert forbidden_edges() == []


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path, PACKAGE))  # raises for a module outside every layer


@pytest.mark.parametrize("importer, target, bad_import", [
    ("layers/router.py", "training", "from moa.training.lit import LanguageModelModule"),
    ("attention/metric.py", "data", "import moa.data.mqar"),
    ("models/language_model.py", "hf", "from moa.hf import modeling"),
    ("kernels/metric_cpu.py", "attention", "from moa.attention.heads import HeadsConfig"),
    ("data/mqar.py", "models", "from moa.models.language_model import build_model"),
    ("dashboard/runs.py", "training", "from moa.training.run_status import read_status"),
    ("training/train_task.py", "hf", "from moa.hf.export import export"),
    ("config.py", "training", "from moa.training import lit"),
    ("layers/ffn.py", "entry", "from moa.params import model_config"),
    ("kernels/neighbours.py", "layers", "    from ..layers import router"),
])
def test_a_forbidden_import_is_caught(tmp_path, importer, target, bad_import):
    """The check is not a stub: each kind of forbidden edge, added to a copy of the
    package (at the top, or indented inside a function as a lazy import), is reported."""
    package = tmp_path / "moa"
    shutil.copytree(PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    path = package / importer
    if bad_import.startswith(" "):
        path.write_text(path.read_text() + f"\n\ndef _lazy():\n{bad_import}\n")
    else:
        path.write_text(f"{bad_import}\n{path.read_text()}")
    edges = forbidden_edges(package)
    assert len(edges) == 1, edges
    assert edges[0].startswith(f"moa/{importer}:") and f"-> {target})" in edges[0]
