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
    "empty data file": (corpus(b""), "data.train_files", "the file is empty"),
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


ENTRY_POINTS = {"train": ["train.py"], "eval": ["eval.py"], "export": ["-m", "moa.export"]}
# (entry point, override, the key named, what the line offers)
# (each case is a subprocess of ~20 s on 2 cores: one in the fast suite, the rest slow)
COMPOSITION_ERRORS = [
    ("train", "model.n_head=4", "model.n_head", "did you mean 'n_heads'?"),
    *[pytest.param(*case, marks=pytest.mark.slow) for case in [
        ("train", "model=foo", "model", "no such option); allowed: discoverlm | gpt | gpt2"),
        ("train", "seed=[1", "seed", "override grammar"),
        ("eval", "trainer=foo", "trainer", "allowed: cpu | ddp"),
        ("eval", "alcca.kk=3", "alcca.kk", "did you mean 'k'?"),
        ("export", "paths=foo", "paths", "allowed: default"),
        ("export", "outt=/tmp/x", "outt", "did you mean 'out'?"),
    ]],
]


def run_command(entry: str, *overrides: str, env: dict | None = None
                ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *ENTRY_POINTS[entry], *overrides], cwd=ROOT,
                          env={**os.environ, "WANDB_MODE": "disabled", **(env or {})},
                          capture_output=True, text=True, timeout=300)


def assert_one_line(result: subprocess.CompletedProcess, key: str, says: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[0].startswith(f"error: invalid config {key}=") and says in lines[0], lines[0]


@pytest.mark.parametrize("entry,override,key,says", COMPOSITION_ERRORS,
                         ids=lambda value: value if "=" in str(value) else None)
def test_hydra_composition_errors_are_one_line_naming_the_key(tmp_path, entry, override, key,
                                                              says):
    """Hydra refuses these before moa runs; the entry points' wrapper (moa.errors.entry_point)
    prints them as moa's own one line, exit 2, and no run directory is left behind."""
    result = run_command(entry, override, f"hydra.run.dir={tmp_path / 'new'}")
    assert_one_line(result, key, says)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("entry,override,key", [
    ("train", "evaluate=maybe", "evaluate"),
    pytest.param("eval", "allow_untrained=maybe", "allow_untrained", marks=pytest.mark.slow),
    pytest.param("export", "overwrite=maybe", "overwrite", marks=pytest.mark.slow),
])
def test_a_refused_invocation_leaves_no_directory_behind(tmp_path, entry, override, key):
    """Hydra made the directory (its .hydra/ and job log) for this invocation: the refusal
    removes it again; one that was there before stays, the refusal in its job log."""
    new = tmp_path / "new"
    extra = {"eval": [f"run_dir={tmp_path}"], "export": [f"run_dir={tmp_path}",
                                                         f"out={tmp_path / 'out'}"]}
    result = run_command(entry, override, *extra.get(entry, []), f"hydra.run.dir={new}")
    assert_one_line(result, key, "true | false")
    assert not new.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    result = run_command(entry, override, *extra.get(entry, []), f"hydra.run.dir={existing}")
    assert_one_line(result, key, "true | false")
    assert (existing / "notes.txt").read_text() == "mine"
    assert f"error: invalid config {key}=" in (existing / f"{entry}.log").read_text()


def test_a_refused_invocation_in_the_default_run_directory_is_one_line_and_leaves_none(
        tmp_path):
    """Without hydra.run.dir: the directory is `${paths.root_dir}/outputs/<date>/<time>`,
    root_dir `${hydra:runtime.cwd}` or MOA_ROOT. The callback that notes it is new resolves
    it (no warning before the one line), and the refusal removes it."""
    inherited = {key: value for key, value in os.environ.items() if key != "MOA_ROOT"}
    for root in ({"MOA_ROOT": str(tmp_path)}, {}):  # the root by name, then the cwd
        result = subprocess.run([sys.executable, str(ROOT / "train.py"), "evaluate=maybe"],
                                cwd=tmp_path, env={**inherited, "WANDB_MODE": "disabled",
                                                   **root}, capture_output=True, text=True,
                                timeout=300)
        assert_one_line(result, "evaluate", "true | false")
        assert list((tmp_path / "outputs").glob("*/*")) == []


def test_train_into_another_runs_directory_exits_2_and_keeps_it(tmp_path, cache_dir):
    """`python train.py ... hydra.run.dir=DIR` where DIR holds another run: refused before
    anything is written, the offer of resume=true or a new directory in the one line."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    records = {"checkpoints/last.ckpt": "weights", "status.json": '{"status": "finished"}',
               "metrics.json": "{}"}
    for name, text in records.items():
        (run_dir / name).write_text(text)
    result = run_command("train", *TINY, f"hydra.run.dir={run_dir}",
                         env={"MOA_CACHE_DIR": str(cache_dir)})
    assert_one_line(result, "hydra.run.dir", "resume=true")
    assert "new hydra.run.dir" in result.stderr
    assert all((run_dir / name).read_text() == text for name, text in records.items())
    assert not (run_dir / "config.yaml").exists()
    assert "holds another run" in (run_dir / "train.log").read_text()
