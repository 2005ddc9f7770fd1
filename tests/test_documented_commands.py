"""Every `python train.py` / `python eval.py` command that the README, docs/ and the
Makefile's targets give composes, and the training ones validate: a documented command
must not fail on its config."""

from __future__ import annotations

import re
import shlex

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from moa.training.eval_task import check_eval_config
from moa.training.run_config import parse_run
from tests.conftest import ROOT

BLOCK_LINE = re.compile(r"^ *python (train|eval)\.py\b(.*)$", re.MULTILINE)  # code blocks
INLINE = re.compile(r"`python (train|eval)\.py\b([^`]+)`")  # in prose (may wrap lines);
# a bare `python eval.py` there names the script, it is no command
RECIPE = re.compile(r"^\t\$\(BIN\)/python (train|eval)\.py\b(.*?)(?: \$\(ARGS\))?$", re.MULTILINE)
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLACEHOLDERS = {"SCHEME": "mha"}  # a word a document asks the reader to fill in


def _documented_commands() -> list[tuple[str, list[str]]]:
    """(script, overrides) of each command in the documents, in code blocks (a trailing
    backslash continues a command on the next line) and in inline code, and in the
    Makefile's recipes (without the user's `$(ARGS)`)."""
    text = "\n".join(document.read_text() for document in DOCUMENTS)
    found = [(m.group(1), m.group(2)) for m in
             BLOCK_LINE.finditer(text.replace("\\\n", " "))]
    found += [(m.group(1), m.group(2)) for m in INLINE.finditer(text)]
    found += [(m.group(1), m.group(2)) for m in RECIPE.finditer((ROOT / "Makefile").read_text())]
    commands = []
    for script, arguments in found:
        for placeholder, value in PLACEHOLDERS.items():
            arguments = arguments.replace(placeholder, value)
        command = (script, shlex.split(arguments, comments=True))
        if command not in commands:
            commands.append(command)
    return commands


def _one_job(overrides: list[str]) -> list[str]:
    """A sweep's first job: `-m` dropped, each swept key at its first value."""
    parsed = OverridesParser.create().parse_overrides([o for o in overrides if o != "-m"])
    return [f"{o.get_key_element()}={next(o.sweep_string_iterator())}"
            if o.is_sweep_override() else o.input_line for o in parsed]


COMMANDS = _documented_commands()


def test_the_documents_have_commands_to_check():
    assert len(COMMANDS) > 30
    assert ("train", ["model=moas", "model.layer_scale_init=1e-4", "model.drop_path=0.1"]) \
        in COMMANDS
    assert ("train", ["-m", "trainer=smoke", "model=gpt", "attention=mha,gqa,mqa,sqa"]) \
        in COMMANDS  # make sweep


@pytest.mark.parametrize("script, overrides", COMMANDS,
                         ids=[" ".join([script, *overrides]) for script, overrides in COMMANDS])
def test_documented_command_composes(compose_config, script, overrides):
    """Training commands validate as a run; eval commands name a run or a checkpoint and
    pass the checks eval.py makes before it reads any file (sampling, trainer, retrofit)."""
    cfg = compose_config(*_one_job(overrides), config_name=script)
    if script == "train" and not cfg.model.get("card_config"):  # the card: a file to read
        parse_run(cfg)
    if script == "eval":
        assert cfg.get("run_dir") or cfg.get("ckpt_path"), "an eval command names its run"
        check_eval_config(cfg)
