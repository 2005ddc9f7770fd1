"""The training objectives (moa/training/objectives/): each stage of the Reactive
Transformer as a smoke run, the stages chained through init_from with frozen parameters
bitwise unchanged, and the properties each stage's loss must have."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch.utils.data import DataLoader

from moa.errors import ConfigError
from moa.models.registry import build_model
from moa.training import train
from moa.training.init_from import init_state
from moa.training.objectives import OBJECTIVES, SpecialTokens, token_metrics
from moa.training.objectives.base import IGNORE_INDEX, label_is_top
from moa.training.run_config import parse_run
from tests.conftest import train_run

# The micro model at test size on small data: a few steps a stage.
SMALL = ("model=rxt_alpha_micro", "model.size=tiny", "trainer=smoke", "trainer.max_steps=4",
         "trainer.val_check_interval=4", "trainer.limit_val_batches=2",
         "trainer.limit_test_batches=2", "data.batch_size=4", "sampling.prompts=[]")
CONVERSATIONS = ("data.num_train_conversations=32", "data.num_val_conversations=8",
                 "data.num_test_conversations=8", "data.num_turns=4")
STAGES = {"rxt_joint": (), "rxt_sft": CONVERSATIONS, "rxt_memory": CONVERSATIONS,
          "rxt_smat": CONVERSATIONS}


def stage(objective: str, *extra: str) -> tuple[str, ...]:
    return (*SMALL, f"objective={objective}", *STAGES.get(objective, ()), *extra)


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory, cache_dir):
    """The four stages, each from the previous run's weights."""
    root = tmp_path_factory.mktemp("rxt")
    runs, previous = {}, ()
    for name in STAGES:
        runs[name] = train_run(root / name, cache_dir, *stage(name, *previous))
        previous = (f"init_from={runs[name]}",)
    return runs


def test_mlm_trains_the_encoder_and_its_head_alone(compose_config, stage_runs):
    source = init_state(stage_runs["rxt_joint"])
    metrics, objects = train(compose_config(*stage("mlm"),
                                            f"init_from={stage_runs['rxt_joint']}"))
    assert metrics["test_loss"] == metrics["test_mlm_loss"] and 0 <= metrics["test_mlm_acc"] <= 1
    trained = objects["module"].model.state_dict()
    changed = {name for name in source if not torch.equal(trained[name], source[name])}
    assert any(name.startswith("encoder.") for name in changed)
    assert any(name.startswith("mlm_head.") for name in changed)
    assert not any(name.startswith(("decoder.", "memory_attention.")) for name in changed
                   if name != "decoder.lm_head.weight")  # the head is the shared embedding


def test_mlm_trains_an_encoder_of_another_attention_scheme(compose_config):
    metrics, _ = train(compose_config(*stage("mlm"), "attention=metric"))
    assert metrics["test_loss"] == metrics["test_mlm_loss"] < 9  # ln(5000) = 8.5 at init
    assert 0 <= metrics["test_mlm_acc"] <= 1


def test_stages_chain_through_init_from(stage_runs):
    for name, run_dir in stage_runs.items():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()
                   if isinstance(v, float)), name
        record = json.loads((run_dir / "run.json").read_text())
        assert (record.get("init_from") is None) == (name == "rxt_joint")
    joint = json.loads((stage_runs["rxt_joint"] / "metrics.json").read_text())
    assert {"test_mlm_acc", "test_ar_loss", "test_acc"} <= joint.keys()
    smat = json.loads((stage_runs["rxt_smat"] / "metrics.json").read_text())
    assert {"test_mlm_acc", "recall_by_distance", "loss_by_turn", "acc_by_turn"} <= smat.keys()
    assert set(smat["loss_by_turn"]) == {"0", "1", "2", "3"}
    assert set(smat["recall_by_distance"]) <= {"1", "2", "3"}


def test_memory_pretraining_changes_the_memory_attention_only(stage_runs):
    before, after = init_state(stage_runs["rxt_sft"]), init_state(stage_runs["rxt_memory"])
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("memory_attention.") for name in changed)


def test_memory_aware_training_keeps_a_part_frozen_until_its_turn(compose_config,
                                                                  stage_runs):
    source = init_state(stage_runs["rxt_memory"])
    _, objects = train(compose_config(*stage("rxt_smat", f"init_from={stage_runs['rxt_memory']}"),
                                      "objective.unfreeze={encoder.*: 1.0}"))
    trained = objects["module"].model.state_dict()
    encoder = [name for name in source if name.startswith("encoder.")]
    assert encoder and all(torch.equal(trained[name], source[name]) for name in encoder)
    assert any(not torch.equal(trained[name], source[name]) for name in source
               if name.startswith("decoder."))


@pytest.fixture(scope="module")
def micro(cache_dir, tmp_path_factory):
    """A tiny micro model and the objective configs' tokens, without a run. Hydra's own
    config is set, so the config's `${hydra:...}` values resolve whichever test runs first."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from moa.data import build_datamodule
    from tests.conftest import CONF_DIR, ROOT, SHARED_DATA

    run_dir = tmp_path_factory.mktemp("micro")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=[
            f"paths.root_dir={ROOT}", f"paths.cache_dir={cache_dir}",
            f"paths.output_dir={run_dir}", f"hydra.run.dir={run_dir}",
            f"paths.shared_data_dir={SHARED_DATA}", "model=rxt_alpha_micro", "model.size=tiny",
            "objective=rxt_smat", *CONVERSATIONS])
    GlobalHydra.instance().clear()
    HydraConfig.instance().set_config(cfg)
    spec = parse_run(cfg)
    data = build_datamodule(cfg.data, cfg.tokenizer, 0, cache_dir)
    data.prepare_data()
    data.setup("fit")
    torch.manual_seed(0)
    model = build_model(spec.model.with_vocab(data.vocab_size))
    batch = next(iter(DataLoader(data.splits.datasets["test"], batch_size=3)))
    return model, SpecialTokens.of(data.tokenizer), batch


def objective(name: str, tokens: SpecialTokens, **values):
    config = replace(OBJECTIVES.parse({"name": name, **values}, "objective"), tokens=tokens)
    return OBJECTIVES.build(config)


def test_joint_decoder_reads_the_encoder_without_sending_it_gradients(micro):
    model, tokens, batch = micro
    turns = {"input_ids": batch["input_ids"][:, 1], "labels": batch["labels"][:, 1]}
    values = objective("rxt_joint", tokens).losses(model, turns, seed=0)
    model.zero_grad()
    values["ar_loss"][0].backward()
    assert all(p.grad is None or not p.grad.any() for p in model.encoder.parameters())
    assert any(p.grad is not None and p.grad.any() for p in model.decoder.parameters())
    total = values["loss"][0]
    torch.testing.assert_close(total, values["mlm_loss"][0] + values["ar_loss"][0])


def test_memory_pretraining_loss_is_the_negative_cosine_to_the_weighted_mean(micro):
    model, tokens, batch = micro
    stage3 = objective("rxt_memory", tokens, first_weight=0.9, weight=0.5, decay=0.1)
    assert [stage3.config.new_data_weight(t) for t in range(6)] == \
        pytest.approx([0.9, 0.4, 0.3, 0.2, 0.1, 0.05])
    one_turn = {"input_ids": batch["input_ids"][:, :1]}
    loss = stage3.losses(model, one_turn)["loss"][0]
    ids, mask = one_turn["input_ids"][:, 0], one_turn["input_ids"][:, 0] != tokens.pad
    memory = model.initial_memory(len(ids))
    with torch.no_grad():
        encoded = model.encode(ids, mask, memory=memory).layers
        written = model.update_memory(memory, encoded, mask)
    slots = memory.size(2)
    new = torch.zeros_like(memory)
    length = min(slots, ids.size(1))
    new[:, :, :length] = (encoded * mask[None, :, :, None])[:, :, :length]
    label = 0.9 * new + 0.1 * memory
    expected = -torch.nn.functional.cosine_similarity(written, label, dim=-1).mean()
    torch.testing.assert_close(loss, expected)
    model.zero_grad()
    loss.backward()
    assert [n for n, p in model.named_parameters()
            if p.grad is not None and p.grad.any() and not n.startswith("memory_attention.")] == []


class LogitsRecord:
    """Stands in for the scores: keeps each turn's logits."""

    def __init__(self) -> None:
        self.logits: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, *rest: torch.Tensor) -> None:
        self.logits.append(logits)


def test_memory_aware_turn_reads_earlier_turns_only(micro):
    """Turn 1's logits change with turn 0 (through the STM), and no turn's with later ones."""
    model, tokens, batch = micro
    stage4 = objective("rxt_smat", tokens)

    def turn_logits(ids: torch.Tensor) -> list[torch.Tensor]:
        record = LogitsRecord()
        with torch.no_grad():
            stage4.conversation(model, {**batch, "input_ids": ids}, record)
        return record.logits

    base = turn_logits(batch["input_ids"])
    later, earlier = batch["input_ids"].clone(), batch["input_ids"].clone()
    later[:, 2] = later[:, 2].roll(1, dims=0)  # other third turns
    earlier[:, 0] = earlier[:, 0].roll(1, dims=0)  # other first turns
    with_later = turn_logits(later)
    assert torch.equal(with_later[0], base[0]) and torch.equal(with_later[1], base[1])
    assert not torch.allclose(turn_logits(earlier)[1], base[1])


def test_an_objective_the_model_lacks_is_an_error_before_training(compose_config, tmp_path):
    with pytest.raises(ConfigError) as error:
        train(compose_config("model=gpt", "model.size=tiny", "trainer=smoke", "objective=mlm"))
    assert error.value.key == "objective" and "encode" in str(error.value)
    other = tmp_path / "other"  # a refused run keeps its directory
    with pytest.raises(ConfigError) as error:
        train(compose_config(*SMALL, "objective=lm", "tokenizer=rxt_bpe",
                             f"paths.output_dir={other}", f"hydra.run.dir={other}"))
    assert error.value.key == "objective" and "decoder-only" in str(error.value)
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_each_model_preset_selects_an_objective_it_has(compose_config):
    """model=rxt_alpha_micro alone trains stage 1 (its preset selects rxt_joint, with its data
    and tokenizer); decoder-only presets keep lm; the command line still chooses."""
    assert compose_config("model=rxt_alpha_micro").objective.name == "rxt_joint"
    assert compose_config("model=rxt_alpha_micro").tokenizer.special_tokens
    assert compose_config("model=rxt_alpha_micro", "objective=mlm").objective.name == "mlm"
    assert compose_config("model=gpt").objective.name == "lm"
    assert compose_config().objective.name == "lm"


def test_eval_on_an_rxt_run_reproduces_its_metrics_and_scores(compose_config, stage_runs):
    from moa.training import evaluate

    run_dir = stage_runs["rxt_smat"]
    trained = json.loads((run_dir / "metrics.json").read_text())
    metrics, _ = evaluate(compose_config(f"run_dir={run_dir}", "trainer.limit_test_batches=2",
                                         config_name="eval"))
    assert json.loads((run_dir / "metrics.json").read_text()) == trained
    assert metrics["recall_by_distance"] == pytest.approx(trained["recall_by_distance"])
    assert metrics["test_mlm_acc"] == pytest.approx(trained["test_mlm_acc"])


class Crash(Exception):
    pass


@pytest.mark.parametrize("name", ["rxt_joint", "rxt_smat"])
def test_resume_continues_masks_and_unfreezing_exactly(compose_config, tmp_path, monkeypatch,
                                                       name):
    """Masks drawn from (seed, step) and parts unfrozen by progress: a run resumed from its
    step-5 checkpoint logs the uninterrupted run's losses, bitwise."""
    from moa.training.lit import LanguageModelModule
    from tests.test_resume import train_curve

    steps = (*stage(name), "trainer.max_steps=8", "trainer.log_every_n_steps=1",
             "evaluate=false", "trainer.deterministic=true")
    train(compose_config(*steps, f"paths.output_dir={tmp_path / 'whole'}"))
    original = LanguageModelModule.training_step

    def crash_at_step_6(self, batch, batch_idx):
        if self.trainer.global_step == 6:
            raise Crash("the node went away")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(LanguageModelModule, "training_step", crash_at_step_6)
    with pytest.raises(Crash):
        train(compose_config(*steps))
    monkeypatch.setattr(LanguageModelModule, "training_step", original)
    train(compose_config(*steps, "resume=true"))
    whole = train_curve(tmp_path / "whole")
    assert [step for step, _ in whole] == list(range(8))
    assert train_curve(tmp_path / "run") == whole


def test_accuracy_counts_a_token_right_when_its_label_has_the_largest_logit():
    logits = torch.randn(3, 7, 50, dtype=torch.float64)
    labels = torch.randint(0, 50, (3, 7))
    labels[0, :4] = logits[0, :4].argmax(-1)  # some right for sure
    labels[1, 2] = IGNORE_INDEX
    labels[2, :] = IGNORE_INDEX
    _, acc, count = token_metrics(logits, labels)
    kept = labels != IGNORE_INDEX
    assert count == kept.sum() == 13
    assert acc == (logits.argmax(-1) == labels)[kept].double().mean().float()
    assert acc >= 4 / 13
    tied = logits[0, 5].argmax()
    logits[0, 5, labels[0, 5]] = logits[0, 5, tied]  # the label ties for the largest
    assert label_is_top(logits, labels)[0, 5]
    assert not label_is_top(logits, labels)[1, 2]  # ignored: never right
