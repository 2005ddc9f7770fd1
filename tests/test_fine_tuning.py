"""init_from=PATH (moa/training/init_from.py) and freeze=[globs] (moa/training/freeze.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moa.errors import ConfigError
from moa.models.language_model import build_model
from moa.training import train
from moa.training.freeze import freeze
from moa.training.init_from import init_state, load_init_weights
from moa.training.run_config import parse_run
from tests.conftest import tiny_model_config, train_run

RUN = ("trainer=smoke", "model=gpt", "tokenizer=byte", "model.n_layers=2", "data.batch_size=8",
       "trainer.max_steps=4", "trainer.val_check_interval=4", "evaluate=false",
       "sampling.prompts=[]")


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, cache_dir):
    """A trained tiny run to start from (trained once for the module)."""
    return train_run(tmp_path_factory.mktemp("source") / "run", cache_dir, *RUN)


def test_init_from_takes_the_weights_and_starts_training_afresh(compose_config, tmp_path,
                                                                source_run):
    source = init_state(source_run)
    cfg = compose_config(*RUN, f"init_from={source_run}", "trainer.max_steps=3",
                         "trainer.val_check_interval=3", "optim.lr=1e-12")
    _, objects = train(cfg)
    trained = objects["module"].model.state_dict()
    for name, value in source.items():  # lr 1e-12: the loaded weights (the source's 4 steps
        torch.testing.assert_close(trained[name], value, rtol=0, atol=1e-9)  # moved ~1e-2)
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3  # its own steps, not the source's 4 + 3
    optimizer_state = last["optimizer_states"][0]["state"]
    assert all(int(state["step"]) == 3 for state in optimizer_state.values())
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["init_from"]["path"] == str(source_run)
    assert record["init_from"]["grown"] == []


def test_init_from_a_checkpoint_or_an_exported_directory_loads_the_same_weights(
        compose_config, tmp_path, source_run):
    pytest.importorskip("transformers")
    from moa.hf.export import export

    out = export(compose_config(f"run_dir={source_run}", f"out={tmp_path / 'exported'}",
                                config_name="export"))
    from_run = init_state(source_run)
    for other in (init_state(source_run / "checkpoints" / "best.ckpt"), init_state(out)):
        assert other.keys() == from_run.keys()
        for name in from_run:
            assert torch.equal(other[name], from_run[name]), name


def test_another_architecture_fails_before_training_naming_keys_and_shapes(
        compose_config, tmp_path, source_run):
    with pytest.raises(ConfigError) as error:
        train(compose_config(*RUN, f"init_from={source_run}", "model.n_layers=3"))
    assert error.value.key == "init_from"
    assert "missing ['blocks.2." in str(error.value)
    assert not (tmp_path / "run" / "metrics.csv").exists()
    # the refused run's status.json keeps its directory for it: the next run takes another
    with pytest.raises(ConfigError) as error:
        train(compose_config(*RUN, f"init_from={source_run}", "model.d_model=32",
                             f"paths.output_dir={tmp_path / 'run2'}",
                             f"hydra.run.dir={tmp_path / 'run2'}"))
    assert "embedding.weight: (265, 64) there, (265, 32) here" in str(error.value)
    assert not (tmp_path / "run2" / "metrics.csv").exists()


def test_a_larger_vocabulary_grows_the_embedding_with_the_mean_of_the_old_rows(tmp_path):
    for tie in (True, False):
        torch.manual_seed(0)
        old = build_model(tiny_model_config(vocab_size=50, tie_embeddings=tie))
        torch.save({"moa_format_version": 1, "model_config": old.config.to_dict(),
                    "state_dict": {f"model.{k}": v for k, v in old.state_dict().items()}},
                   tmp_path / "old.ckpt")
        new = build_model(tiny_model_config(vocab_size=53, tie_embeddings=tie))
        done = load_init_weights(new, tmp_path / "old.ckpt")
        grown = ["embedding.weight", "lm_head.weight"]
        assert done["vocab_grown_from"] == 50 and done["grown"] == sorted(grown)
        for name in grown:
            old_rows, new_rows = old.state_dict()[name], new.state_dict()[name]
            assert torch.equal(new_rows[:50], old_rows)
            expected = old_rows.mean(dim=0)
            for row in range(50, 53):
                torch.testing.assert_close(new_rows[row], expected)
        for name, value in old.state_dict().items():
            if name not in grown:
                assert torch.equal(new.state_dict()[name], value)
        assert (new.lm_head.weight is new.embedding.weight) == tie


@pytest.mark.parametrize("overrides, reason", [
    (["resume=true"], "resume"),
    (["resume=auto"], "resume"),
    (["ckpt_path=/some/file.ckpt"], "ckpt_path"),
])
def test_init_from_with_resume_or_ckpt_path_is_an_error(compose_config, source_run, overrides,
                                                        reason):
    with pytest.raises(ConfigError) as error:
        train(compose_config(*RUN, f"init_from={source_run}", *overrides))
    assert error.value.key == "init_from" and reason in str(error.value)


def test_init_from_a_missing_path_is_an_error(compose_config, tmp_path):
    with pytest.raises(ConfigError, match="not found") as error:
        train(compose_config(*RUN, f"init_from={tmp_path / 'nowhere'}"))
    assert error.value.key == "init_from"


def test_frozen_parameters_are_bitwise_unchanged_after_training(compose_config, tmp_path,
                                                                 source_run):
    source = init_state(source_run)
    cfg = compose_config(*RUN, f"init_from={source_run}", "freeze=[blocks.0.*,embedding.*]",
                         "optim.lr=1e-2")
    _, objects = train(cfg)
    model = objects["module"].model
    trained = model.state_dict()
    frozen = [n for n in source if n.startswith(("blocks.0.", "embedding.", "lm_head."))]
    trainable = [n for n in source if n not in frozen]
    assert frozen and trainable
    for name in frozen:  # lm_head.weight is the tied embedding: frozen with it
        assert torch.equal(trained[name], source[name]), name
    assert all(not torch.equal(trained[n], source[n]) for n in trainable
               if n.startswith("blocks.1.") and n.endswith("weight"))
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    expected = sum(p.numel() for n, p in model.named_parameters()
                   if n.startswith(("blocks.0.", "embedding.")))
    assert record["parameters_frozen"] == expected


def test_freeze_counts_and_tied_weights():
    model = build_model(tiny_model_config())
    total = sum(p.numel() for p in model.parameters())
    counts = freeze(model, ["lm_head.*"])  # the tied head is the embedding
    assert counts == {"frozen": 50 * 32, "trainable": total - 50 * 32}
    assert not model.embedding.weight.requires_grad


def test_a_freeze_pattern_matching_nothing_is_an_error():
    with pytest.raises(ConfigError, match="matches no parameter") as error:
        freeze(build_model(tiny_model_config()), ["blocks.*", "block.0.*"])
    assert error.value.key == "freeze" and error.value.value == "block.0.*"


def test_freeze_must_be_a_list_of_globs(compose_config):
    with pytest.raises(ConfigError) as error:
        parse_run(compose_config("freeze=3"))
    assert error.value.key == "freeze"
    parse_run(compose_config("freeze=[blocks.0.*]"))


def test_init_from_run_dir_without_checkpoints_is_an_error(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ConfigError, match="no checkpoint found"):
        init_state(Path(tmp_path))


def test_discoverlm_sft_fine_tunes_a_pretrained_run_on_the_alpaca_slice(compose_config, tmp_path,
                                                                       cache_dir, shared_data):
    pretrained = train_run(tmp_path / "pretrain", cache_dir, "trainer=smoke", "model=discoverlm",
                           "model.size=tiny", "model.max_seq_len=256", "tokenizer=byte",
                           "data.batch_size=2", "trainer.max_steps=1",
                           "trainer.val_check_interval=1", "evaluate=false")
    cfg = compose_config("experiment=discoverlm_sft", f"init_from={pretrained}",
                         "trainer.max_steps=2", "trainer.val_check_interval=2",
                         "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
                         "data.batch_size=2", "data.eval_batch_size=8")
    metrics, _ = train(cfg)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["init_from"]["path"] == str(pretrained)
    data = record["data"]
    assert data["corpus"] == "chat"
    assert sum(data["blocks"].values()) + sum(data["dropped_no_reply_in_block"].values()) \
        + data["skipped_no_assistant_turn"] == 1000
    for split in ("validation", "test"):  # byte tokens: some instructions fill the block
        assert data["blocks"][split] + data["dropped_no_reply_in_block"][split] == 50
    assert 0 < metrics["test_loss"] < 10
