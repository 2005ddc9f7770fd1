"""Bad input on the command line: one line naming the thing, no traceback.

Each case is also tested in-process where its check lives (test_config, test_data,
test_tokenizer, test_checkpoint, test_resume); this runs the commands a user types."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

TINY = ("trainer=smoke", "model=gpt", "evaluate=false")


def write(tmp_path: Path, name: str, content: bytes) -> Path:
    (tmp_path / name).write_bytes(content)
    return tmp_path / name


def corpus(content: bytes):
    return lambda tmp: ["data=text_files", "tokenizer=byte", "data.sample_by=paragraph",
                        f"data.train_files={write(tmp, 'corpus.txt', content)}"]


CASES = {
    "empty corpus": (corpus(b"\n\n \n"), "data.train_files", "no non-empty text"),
    "corpus smaller than one block": (corpus(b"a few\n\nshort\n\nparagraphs\n"), "data.",
                                      "tokens"),
    "non-UTF-8 text": (corpus("caf\u00e9\n".encode("latin-1")), "data.train_files",
                       "not UTF-8"),
    "missing tokenizer file": (
        lambda tmp: ["tokenizer=pretrained", f"tokenizer.path={tmp / 'nope.json'}"],
        "tokenizer.path", ""),
    "corrupt tokenizer file": (
        lambda tmp: ["tokenizer=pretrained",
                     f"tokenizer.path={write(tmp, 'tokenizer.json', b'{not json')}"],
        "tokenizer.path", ""),
    "missing checkpoint": (lambda tmp: [f"ckpt_path={tmp / 'nope.ckpt'}", "tokenizer=byte"],
                           "ckpt_path", "not found"),
    "resume with no checkpoint": (lambda tmp: ["resume=true", "tokenizer=byte"], "resume",
                                  "no checkpoint to resume from"),
    "negative lr": (lambda tmp: ["optim.lr=-0.1"], "optim.lr", "positive"),
    "dropout above 1": (lambda tmp: ["model.dropout=1.5"], "model.dropout", "dropout < 1.0"),
    "top-k above the paths": (
        lambda tmp: ["attention=moa", "router=topk", "router.router_topk=5"],
        "attention.router.router_topk", "the number of paths"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line(case, tmp_path, cache_dir):
    overrides, key, says = CASES[case]
    env = {**os.environ, "MOA_CACHE_DIR": str(cache_dir), "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, "train.py", *TINY, *overrides(tmp_path),
                             f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: invalid config {key}") and says in last, last
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_override_of_a_missing_key_names_it(tmp_path):
    """Hydra refuses it before moa runs: its message names the key and how to add one."""
    result = subprocess.run([sys.executable, "train.py", "model.n_head=4",
                             f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1
    assert "Could not override 'model.n_head'" in result.stderr
    assert "Traceback" not in result.stderr
