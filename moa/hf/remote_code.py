"""The model's code, written into an exported directory as transformers "remote code".

`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` then works in a Python
that has torch, transformers and omegaconf (which moa's config checks use) but not moa:
config.json's `auto_map` names `modeling_moa.MoaConfig` and `modeling_moa.MoaForCausalLM`,
and transformers imports modeling_moa.py from DIR with the files it imports.

The files are generated at export time from the installed package, never kept by hand:
every module that `moa.hf.modeling` imports, directly or not (lazy and TYPE_CHECKING
imports included), is copied with its `moa.` imports made relative. transformers finds a
remote module's files by their `from .name import` lines and copies them into one flat
folder, so the copies are flat too: `moa/attention/metric.py` becomes
`moa_attention_metric.py`, a package's `__init__.py` becomes `moa_attention.py`, and
`moa/hf/modeling.py` becomes `modeling_moa.py`. Model code imports no training, data or
Hugging Face export code (tests/test_layers.py), so the copy is the model alone. Optional
dependencies stay optional: Triton and faiss are imported inside the functions that use
them, which the default CPU path never calls.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the installed moa/
ENTRY = "moa.hf.modeling"
MODELING_FILE = "modeling_moa"
AUTO_MAP = {"AutoConfig": f"{MODELING_FILE}.MoaConfig",
            "AutoModelForCausalLM": f"{MODELING_FILE}.MoaForCausalLM"}


def source_file(module: str) -> Path:
    """moa.attention.metric -> moa/attention/metric.py; moa.attention -> .../__init__.py."""
    path = PACKAGE_DIR.parent.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def flat_name(module: str) -> str:
    """The copy's module name: moa.attention.metric -> moa_attention_metric."""
    return MODELING_FILE if module == ENTRY else module.replace(".", "_")


def is_module(name: str) -> bool:
    path = PACKAGE_DIR.parent.joinpath(*name.split("."))
    return path.is_dir() or path.with_suffix(".py").is_file()


def moa_imports(module: str) -> list[ast.ImportFrom]:
    """Every `from moa... import` statement of `module`, wherever it stands."""
    tree = ast.parse(source_file(module).read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "moa" for a in node.names):
            raise ValueError(f"{module}: write `from moa... import`, not `import moa...`")
        if isinstance(node, ast.ImportFrom) and node.level:
            raise ValueError(f"{module}: relative imports are not used in moa")
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "moa":
            if node.module == "moa":
                raise ValueError(f"{module}: imports the moa facade, which loads the export")
            found.append(node)
    return found


def bundle() -> list[str]:
    """The modules the model code needs: `ENTRY` and everything it imports, sorted."""
    seen, todo = set(), [ENTRY]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for node in moa_imports(module):
            submodules = [f"{node.module}.{a.name}" for a in node.names
                          if is_module(f"{node.module}.{a.name}")]
            todo += submodules
            if len(submodules) < len(node.names):  # names defined in node.module itself
                todo.append(node.module)
    return sorted(seen)


def relative_source(module: str) -> str:
    """`module`'s source with each `from moa.x.y import a` made `from .moa_x_y import a`.

    An imported submodule (`from moa.layers import balance`) becomes
    `from . import moa_layers_balance as balance`, preceded by a `from .moa_layers_balance
    import __name__ as ...` line: transformers finds the files to copy by such lines."""
    lines = source_file(module).read_text(encoding="utf-8").splitlines(keepends=True)
    for node in sorted(moa_imports(module), key=lambda n: n.lineno, reverse=True):
        indent = " " * node.col_offset
        names = [a for a in node.names if not is_module(f"{node.module}.{a.name}")]
        modules = [a for a in node.names if is_module(f"{node.module}.{a.name}")]
        new = []
        if names:
            listed = ", ".join(a.name if a.asname is None else f"{a.name} as {a.asname}"
                               for a in names)
            new.append(f"{indent}from .{flat_name(node.module)} import {listed}\n")
        for alias in modules:
            flat = flat_name(f"{node.module}.{alias.name}")
            new.append(f"{indent}from .{flat} import __name__ as _{flat}_file  # noqa: F401\n")
            new.append(f"{indent}from . import {flat} as {alias.asname or alias.name}\n")
        lines[node.lineno - 1: node.end_lineno] = new
    return "".join(lines)


def write_remote_code(out: Path) -> list[str]:
    """Write the model's code into `out`; return the files' names."""
    written = []
    for module in bundle():
        name = f"{flat_name(module)}.py"
        origin = source_file(module).relative_to(PACKAGE_DIR.parent)
        header = (f"# Generated by `python -m moa.export` from {origin.as_posix()}, with its moa "
                  "imports made relative: edit the original, not this copy.\n")
        (out / name).write_text(header + relative_source(module), encoding="utf-8")
        written.append(name)
    return written
