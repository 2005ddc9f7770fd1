"""Talk to a trained model in the terminal:

    python -m moa.chat run_dir=DIR      (a run, or a directory written by python -m moa.export)

The reply streams token by token (KV-cache decoding). A causal LM re-reads the
conversation each turn; a Reactive Transformer run (model=rxt_alpha_micro) reads its
short-term memory, which each finished turn updates. Commands: /reset (forget the
conversation; RxT: the initial memory), /system TEXT (set the system message), /temp T
(sampling temperature, 0 greedy), /quit. Ctrl-C stops a reply, not the program. With
stdin piped, every line is one user turn (or command) and each reply is printed on its
own line; notices go to stderr. Options: conf/chat.yaml (`sampling.temperature=0`,
`system=...`, `device=cuda`). The conversation itself is moa/training/conversation.py.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

import torch
from omegaconf import DictConfig, OmegaConf

from moa.config import ModelConfig
from moa.data.tokenizer import Tokenizer
from moa.errors import ConfigError, exit_on_config_error
from moa.models.generation import SamplingConfig
from moa.models.language_model import build_model
from moa.schema import parse
from moa.training.conversation import Conversation
from moa.training.reactive_conversation import ReactiveConversation
from moa.training.run_files import WEIGHTS_PREFIX, load_run

CONFIG = Path(__file__).resolve().parent.parent / "conf" / "chat.yaml"
COMMANDS = "/reset, /system TEXT, /temp T, /quit"


def load_config(arguments: list[str]) -> DictConfig:
    """conf/chat.yaml with `key=value` arguments; an unknown key is a ConfigError."""
    defaults = OmegaConf.load(CONFIG)
    given = OmegaConf.from_dotlist(arguments)
    for key in given:
        if key not in defaults:
            raise ConfigError(str(key), given[key], f"keys {sorted(defaults)}", "unknown key")
    return OmegaConf.merge(defaults, given)


CONVERSATIONS = {"language_model": Conversation, "reactive": ReactiveConversation}


def open_conversation(cfg: DictConfig, notice=print) -> Conversation | ReactiveConversation:
    """The model and tokenizer of `cfg.run_dir` / `cfg.ckpt_path` in a new conversation of
    its architecture's kind: a causal LM re-reads the history, RxT keeps it in its memory."""
    directory, _run_cfg, checkpoint = load_run(cfg)
    tokenizer = Tokenizer.load(directory / "tokenizer.json", key="run_dir")
    model = build_model(ModelConfig.from_dict({**checkpoint["model_config"], "compile": False}))
    model.load_state_dict({name.removeprefix(WEIGHTS_PREFIX): value
                           for name, value in checkpoint["state_dict"].items()})
    if cfg.device not in ("cpu", "cuda"):
        raise ConfigError("device", cfg.device, "cpu | cuda")
    model.to(cfg.device)
    sampling = parse(SamplingConfig, cfg.sampling, "sampling")
    generator = torch.Generator(device=cfg.device).manual_seed(sampling.seed)
    conversation = CONVERSATIONS[model.config.architecture]
    return conversation(model, tokenizer, sampling, cfg.system, notice, generator)


def chat(conversation: Conversation, lines: Iterable[str], out: TextIO, err: TextIO,
         reply_prefix: str = "") -> None:
    """Answer each line (a user turn or a command) until /quit or the end of the lines."""
    for line in lines:
        line = line.rstrip("\n")
        command, _, argument = line.partition(" ")
        if command == "/quit":
            return
        if command == "/reset":
            conversation.reset()
            err.write("[conversation reset]\n")
        elif command == "/system":
            conversation.system = argument or None
            err.write(f"[system message: {argument!r}]\n")
        elif command == "/temp":
            try:
                conversation.set_temperature(float(argument))
                err.write(f"[temperature {float(argument):g}]\n")
            except (ValueError, ConfigError):
                err.write(f"[/temp takes a number >= 0, not {argument!r}]\n")
        elif line.startswith("/"):
            err.write(f"[unknown command {command!r}; commands: {COMMANDS}]\n")
        elif line.strip():
            _print_reply(conversation.stream(line), out, err, reply_prefix)


def _print_reply(pieces: Iterator[str], out: TextIO, err: TextIO, prefix: str) -> None:
    out.write(prefix)
    try:
        for piece in pieces:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:  # Ctrl-C: stop this reply, keep the conversation
        pieces.close()
        err.write(" [stopped]")
    out.write("\n")
    out.flush()


def _typed_lines(err: TextIO) -> Iterator[str]:
    """Lines typed at the prompt until Ctrl-D; Ctrl-C at the prompt does not quit."""
    while True:
        try:
            yield input("you> ")
        except EOFError:
            return
        except KeyboardInterrupt:
            err.write("\n[/quit or Ctrl-D to leave]\n")


def main(arguments: list[str]) -> None:
    with exit_on_config_error():
        cfg = load_config(arguments)
        conversation = open_conversation(cfg, notice=lambda text: print(text, file=sys.stderr))
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {cfg.run_dir or cfg.ckpt_path}; commands: {COMMANDS}",
              file=sys.stderr)
    lines = _typed_lines(sys.stderr) if interactive else sys.stdin
    chat(conversation, lines, sys.stdout, sys.stderr, "model> " if interactive else "")


if __name__ == "__main__":
    main(sys.argv[1:])
