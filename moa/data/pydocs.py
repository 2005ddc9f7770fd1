"""An English corpus that needs no download: the documentation shipped inside CPython.

Documents, in this order:
1. each entry of `pydoc_data.topics.topics` (the language reference pages `help()` shows:
   statements, operators, data model, ...), in sorted topic order;
2. one per standard-library module, made of its module docstring and then the docstrings of
   its classes, functions and methods, each under its qualified name (`json.JSONDecoder.decode`).
   Docstrings come from parsing the `.py` files with `ast` (nothing is imported, so no module
   side effects) and are normalised with `inspect.cleandoc`. Files are visited in sorted
   order below `sysconfig.get_paths()["stdlib"]`; `SKIPPED_DIRS` leaves out test suites,
   installed third-party packages, IDLE, lib2to3 and the generated codec boilerplate of
   `encodings`. Functions nested inside functions are left out (private helpers).

On CPython 3.11.7: 484 documents, 2.28 M characters (0.46 M from the 79 topics), about
0.59 M tokens with the default 8192-token BPE; built in ~4 s. The corpus follows the running
interpreter, so the file is cached per Python version; runs record the sha256 of the
documents (`Corpus.sha256`).
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import platform
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from pydoc_data.topics import topics

from moa.data.cache_file import written_atomically

FORMAT_VERSION = 1  # bump when the extraction below changes, to invalidate cached files
SKIPPED_DIRS = {
    "site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib", "lib2to3",
    "turtledemo", "ensurepip", "encodings",
}


def pydocs_file(cache_dir: Path) -> Path:
    """The cached JSON-lines file of documents (`{"text": ...}` per line), built if absent."""
    name = f"pydocs-py{platform.python_version()}-v{FORMAT_VERSION}.jsonl"
    path = Path(cache_dir) / "pydocs" / name
    if not path.is_file():
        with written_atomically(path) as partial, partial.open("w", encoding="utf-8") as out:
            for text in pydocs_documents():
                out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


def pydocs_documents(stdlib: Path | None = None) -> Iterator[str]:
    """The documents in a fixed order; `stdlib` (a folder of .py files) restricts the walk."""
    for topic in sorted(topics):
        yield topics[topic].strip()
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    for path in _module_files(root):
        text = _module_document(path, _module_name(path, root))
        if text:
            yield text


def _module_files(root: Path) -> Iterator[Path]:
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in SKIPPED_DIRS
                               and not d.startswith((".", "config-")))
        for file in sorted(files):
            if file.endswith(".py") and not file.startswith("test_"):
                yield Path(folder) / file


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _module_document(path: Path, module: str) -> str:
    """Module docstring, then `qualified.name` + docstring per documented class/function."""
    try:
        tree = ast.parse(path.read_bytes())  # bytes: honours PEP 263 coding cookies
    except SyntaxError:  # a few stdlib files are data for tests of broken syntax
        return ""
    sections = []
    module_doc = ast.get_docstring(tree, clean=False)
    if module_doc:
        sections.append(f"{module}\n\n{inspect.cleandoc(module_doc)}")
    for name, doc in _definition_docstrings(tree.body, module):
        sections.append(f"{name}\n\n{inspect.cleandoc(doc)}")
    return "\n\n".join(sections)


def _definition_docstrings(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, str]]:
    definitions = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in body:
        if not isinstance(node, definitions):
            continue
        name = f"{prefix}.{node.name}"
        doc = ast.get_docstring(node, clean=False)
        if doc:
            yield name, doc
        if isinstance(node, ast.ClassDef):
            yield from _definition_docstrings(node.body, name)
