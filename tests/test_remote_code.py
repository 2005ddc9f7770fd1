"""An exported directory loads without moa (moa/hf/remote_code.py): transformers runs the
model code the export wrote into it (trust_remote_code=True), with the same outputs."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import sysconfig

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers.dynamic_module_utils import get_relative_import_files  # noqa: E402

from moa.data.chat_template import render  # noqa: E402
from moa.hf.export import export  # noqa: E402
from moa.hf.remote_code import MODELING_FILE, bundle, relative_source  # noqa: E402
from moa.models.generation import SamplingConfig, generate  # noqa: E402
from moa.training.init_from import init_state  # noqa: E402
from moa.training.run_files import load_exported  # noqa: E402
from tests.conftest import train_run  # noqa: E402

# the default model (moa_metric: metric attention, the MoA mixture) at its tiny size
RUN = ("trainer=smoke", "tokenizer=byte", "trainer.max_steps=2", "trainer.val_check_interval=2",
       "data.batch_size=4", "evaluate=false", "sampling.prompts=[]")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]

# Run with -I -S: no PYTHONPATH, no current directory, no .pth files (so not the editable
# install's finder); then only the environment's site-packages, where moa is not a package.
WITHOUT_MOA = """
import json, sys
sys.path.append({site!r})
try:
    import moa
except ImportError:
    pass
else:
    raise SystemExit("moa is importable from " + str(moa.__file__))
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained({out!r}, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained({out!r}, trust_remote_code=True)
ids = tokenizer.apply_chat_template({messages!r}, add_generation_prompt=True,
                                    return_tensors="pt", return_dict=False)
with torch.no_grad():
    logits = model(ids).logits
generated = model.generate(ids, max_new_tokens=8, do_sample=False)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("moa", "faiss")
                or m.endswith("metric_triton"))
print(json.dumps({{"class": type(model).__module__, "ids": ids[0].tolist(),
                  "text": tokenizer.decode(ids[0]), "logits": logits[0, -1].tolist(),
                  "generated": generated[0].tolist(), "loaded": loaded}}))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory, cache_dir):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tests.conftest import CONF_DIR

    base = tmp_path_factory.mktemp("remote")
    run_dir = train_run(base / "run", cache_dir, *RUN)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="export", overrides=[f"run_dir={run_dir}",
                                                        f"out={base / 'exported'}"])
    GlobalHydra.instance().clear()
    return export(cfg)


def test_the_exported_directory_loads_and_generates_without_moa(exported, tmp_path):
    script = WITHOUT_MOA.format(site=sysconfig.get_paths()["purelib"], out=str(exported),
                                messages=MESSAGES)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-I", "-S", "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert remote["class"].startswith("transformers_modules.")
    assert remote["class"].endswith(MODELING_FILE)
    assert remote["loaded"] == []  # no moa, no faiss, no Triton kernel on the CPU path

    from moa.config import ModelConfig
    from moa.models.language_model import build_model

    checkpoint = load_exported(exported)
    model = build_model(ModelConfig.from_dict(checkpoint["model_config"])).eval()
    model.load_state_dict(init_state(exported))
    assert remote["text"] == render(MESSAGES, add_generation_prompt=True)
    ids = torch.tensor([remote["ids"]])
    with torch.no_grad():
        ours = model(ids).logits[0, -1]
    torch.testing.assert_close(torch.tensor(remote["logits"]), ours, rtol=1e-5, atol=1e-5)
    expected = generate(model, ids, SamplingConfig(max_new_tokens=8, temperature=0.0))
    assert remote["generated"] == expected[0].tolist()


def test_the_remote_code_is_the_packages_model_code_generated(exported):
    modules = bundle()
    layers = {module.split(".")[1] for module in modules}
    assert layers <= {"attention", "kernels", "layers", "models", "config", "schema",
                      "registry", "errors", "hf"}
    assert [m for m in modules if m.startswith("moa.hf")] == ["moa.hf.modeling"]
    for module in modules:
        name = MODELING_FILE if module == "moa.hf.modeling" else module.replace(".", "_")
        copy = (exported / f"{name}.py").read_text()
        assert copy.endswith(relative_source(module))  # after the "generated from" line
        absolute = [n.module for n in ast.walk(ast.parse(copy))
                    if isinstance(n, ast.ImportFrom) and n.level == 0
                    and (n.module or "").split(".")[0] == "moa"]
        assert absolute == [], module
    # transformers copies (and downloads from the Hub) the files its relative imports name
    found = {p.split("/")[-1] for p in get_relative_import_files(str(exported / "modeling_moa.py"))}
    written = {p.name for p in exported.glob("*.py")} - {"modeling_moa.py"}
    assert found == written


def test_import_moa_still_loads_the_directory_without_remote_code(exported):
    from transformers import AutoModelForCausalLM

    from moa.hf.modeling import MoaForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(exported)) is MoaForCausalLM
