"""Building our CPU kernels (the `*.cpp` files beside this one) with PyTorch's extension
loader, on first use or at `make install`.

A build takes 10-25 s and is cached under `TORCH_EXTENSIONS_DIR` (by default
~/.cache/torch_extensions); ninja from PyPI, a dependency, runs it. Each kernel registers
its ops under a `torch.ops` namespace of its own. Where a kernel cannot be built (no C++
compiler), `load_ops` warns once, with what runs instead, and returns None.
"""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path
from typing import Any

import ninja
import torch
from torch.utils.cpp_extension import load


def build(name: str, source: Path, defines: tuple[str, ...] = ()) -> None:
    """Compile and load `source` as the extension `name`, with `defines` (-D flags)."""
    vector = (["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma"]
              if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
              else ["-DCPU_CAPABILITY=DEFAULT"])
    path = os.environ.get("PATH", "")
    # The loader runs `ninja` from PATH: the PyPI package's, where the system has none
    # (an environment that is not activated leaves its bin folder off PATH).
    os.environ["PATH"] = os.pathsep.join([path, ninja.BIN_DIR])
    try:
        load(name, [str(source)], extra_cflags=["-O3", "-fopenmp", *vector, *defines],
             extra_ldflags=["-fopenmp"], is_python_module=False)
    finally:
        os.environ["PATH"] = path


def load_ops(name: str, source: Path, namespace: str, instead: str) -> Any | None:
    """`torch.ops.<namespace>` once `source` is built as `name`; None, with a warning that
    says what runs `instead`, where it cannot be built."""
    try:
        build(name, source)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
        warnings.warn(f"the {name} kernel could not be built ({error}); {instead}",
                      stacklevel=3)
        return None
    return getattr(torch.ops, namespace)
