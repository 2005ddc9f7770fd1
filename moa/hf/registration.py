"""Register `moa.hf.modeling` with transformers' Auto classes when transformers is imported.

`import moa` must make `AutoModelForCausalLM.from_pretrained(exported_dir)` (and, for an
RxT encoder's export, `AutoModelForMaskedLM`) work, but importing transformers' model
classes costs seconds, which every `train.py` run would pay. So `import moa` registers at
once only if transformers is already loaded; otherwise it leaves a finder on
`sys.meta_path` that registers `moa.hf.modeling`'s classes as soon as the `transformers`
package is loaded and no module that holds them is half-imported, then removes itself.
(The registration is here, not in modeling.py, because the export copies modeling.py into
the exported directory as remote code, which must not register anything in the process
that loads it.)
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from types import ModuleType

PACKAGE = "transformers"


MODULES = ("moa.hf.modeling", "moa.hf.masked_lm")  # the classes registered
_importing: set[str] = set()  # which of PACKAGE and MODULES are being executed now


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Wraps the loading of transformers and of MODULES: registration runs once
    transformers is loaded and none of them is half-imported. (`from moa.hf.modeling
    import ...` first imports transformers from inside modeling.py, whose classes do not
    exist yet at that point.)"""

    def find_spec(self, name: str, path=None, target=None):
        if name != PACKAGE and name not in MODULES:
            return None
        sys.meta_path.remove(self)  # find the real spec
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def execute_then_register(module: ModuleType) -> None:
            _importing.add(name)
            try:
                execute(module)
            finally:
                _importing.discard(name)
            _register_when_ready()

        spec.loader.exec_module = execute_then_register
        return spec


def register_with_transformers() -> None:
    """Register now if transformers is loaded, else when it is (no-op without it)."""
    if PACKAGE in sys.modules:
        _register()
    elif importlib.util.find_spec(PACKAGE) is not None and not any(
            isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


def _register_when_ready() -> None:
    if PACKAGE not in sys.modules or _importing:
        return
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterImport)]
    _register()


def _register() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    modeling = importlib.import_module("moa.hf.modeling")
    AutoConfig.register(modeling.MODEL_TYPE, modeling.MoaConfig, exist_ok=True)
    AutoModelForCausalLM.register(modeling.MoaConfig, modeling.MoaForCausalLM, exist_ok=True)
    masked_lm = importlib.import_module("moa.hf.masked_lm")  # an RxT encoder: fill-mask
    AutoConfig.register(masked_lm.MODEL_TYPE, masked_lm.MoaEncoderConfig, exist_ok=True)
    AutoModelForMaskedLM.register(masked_lm.MoaEncoderConfig, masked_lm.MoaForMaskedLM,
                                  exist_ok=True)
