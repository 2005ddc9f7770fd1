"""MQAR: every scored label is the value bound to its query key, drawn as Zoology draws it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import default_collate

from moa.data import CORPORA, build_datamodule
from moa.data.mqar import IGNORE_INDEX, MQARConfig, MQARDataset, multiquery_ar
from moa.errors import ConfigError
from moa.models.language_model import build_model
from moa.training.objectives import scored_forward, token_metrics
from tests.conftest import CONF_DIR, tiny_model_config
from tests.test_head import moa_head


def generate(seed: int = 0, n: int = 2000, **config):
    return multiquery_ar(MQARConfig(**config), n, np.random.default_rng(seed))


@pytest.mark.parametrize("config", [
    {}, {"num_kv_pairs": 8, "seq_len": 32, "block_size": 32},
    {"vocab_size": 12, "num_kv_pairs": 2, "seq_len": 9, "block_size": 9},
])
def test_labels_are_the_values_bound_to_the_query_keys(config):
    mqar = MQARConfig(**config)
    inputs, labels = generate(**config)
    n, k, half = len(inputs), mqar.num_kv_pairs, mqar.vocab_size // 2
    assert inputs.shape == labels.shape == (n, mqar.seq_len)
    keys, values = inputs[:, 0 : 2 * k : 2], inputs[:, 1 : 2 * k : 2]  # (N, k)
    assert ((keys >= 1) & (keys < half)).all()
    assert ((values >= half) & (values < mqar.vocab_size)).all()
    assert all(len(set(row)) == k for row in keys) and all(len(set(row)) == k for row in values)

    scored = labels != IGNORE_INDEX
    assert (scored.sum(axis=1) == k).all() and not scored[:, : 2 * k].any()
    rows, positions = np.nonzero(scored)
    assert ((positions - 2 * k) % 2 == 0).all()  # queries sit at even offsets after the prefix
    match = keys[rows] == inputs[rows, positions][:, None]  # (N*k, k): which pair was queried
    assert (match.sum(axis=1) == 1).all()
    assert (labels[rows, positions] == values[rows][match]).all()
    queried = np.sort(inputs[rows, positions].reshape(n, k), axis=1)
    assert (queried == np.sort(keys, axis=1)).all()  # every key is asked exactly once


def test_keys_and_values_are_uniform_at_every_position():
    inputs, _ = generate(n=6000, vocab_size=12, num_kv_pairs=2, seq_len=9, block_size=9)
    for position in range(4):  # k1 v1 k2 v2: 5 keys in [1, 6), 6 values in [6, 12)
        counts = np.unique(inputs[:, position], return_counts=True)[1]
        expected = 6000 / (5 if position % 2 == 0 else 6)
        assert len(counts) == (5 if position % 2 == 0 else 6)
        assert (abs(counts - expected) < 0.1 * expected).all()


def test_same_seed_same_examples_and_other_seeds_differ():
    first, again, other = generate(seed=3), generate(seed=3), generate(seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])


def test_query_distance_follows_the_power_law():
    def mean_gap(power_a: float) -> float:
        inputs, labels = generate(power_a=power_a, seq_len=128, block_size=128)
        return float((np.nonzero(labels != IGNORE_INDEX)[1] - 8).mean() / 2)

    slots = (128 - 8) // 2
    assert abs(mean_gap(1.0) - (slots - 1) / 2) < 1  # power_a = 1: uniform over the slots
    assert mean_gap(0.01) < 0.6 * mean_gap(1.0)  # small power_a: queries near the prefix


@pytest.mark.parametrize("power_a", [0.01, 0.5])
def test_query_slots_are_drawn_with_the_power_law_probabilities(power_a):
    """One pair, 8 slots: the slot g of the query is drawn with P(g) proportional to
    (g + 1)^(power_a - 1), within 0.02 over 20,000 examples (about 6 standard errors)."""
    inputs, labels = generate(n=20_000, power_a=power_a, num_kv_pairs=1, seq_len=18,
                              block_size=18, vocab_size=16)
    slot = (np.argmax(labels != IGNORE_INDEX, axis=1) - 2) // 2  # (N,)
    frequency = np.bincount(slot, minlength=8) / len(slot)
    probability = np.arange(1, 9) ** (power_a - 1.0)
    np.testing.assert_allclose(frequency, probability / probability.sum(), atol=0.02)


def test_one_pair_in_four_tokens_is_the_smallest_example():
    """k v q x: the key, its value, the query of the key and its answer's slot; int64."""
    inputs, labels = generate(n=50, num_kv_pairs=1, seq_len=4, block_size=4, vocab_size=4)
    assert inputs.dtype == labels.dtype == np.int64
    assert (inputs[:, 2] == inputs[:, 0]).all() and (labels[:, 2] == inputs[:, 1]).all()
    assert (labels[:, [0, 1, 3]] == IGNORE_INDEX).all()


@pytest.mark.parametrize("random_non_queries", [False, True])
def test_fillers_carry_no_answer(random_non_queries):
    """Outside the prefix, every position but the queries is a filler: all 0, or tokens
    uniform over the vocabulary and independent of the row's values. A filler next to a
    query (either side) is its value no more often than chance, and the fillers hold the
    row's values as often as chance: a value leaked anywhere in the second part shows."""
    vocab, k, length = 12, 2, 16
    inputs, labels = generate(n=4000, vocab_size=vocab, num_kv_pairs=k, seq_len=length,
                              block_size=length, random_non_queries=random_non_queries)
    scored = labels != IGNORE_INDEX
    filler = ~scored
    filler[:, : 2 * k] = False
    if not random_non_queries:
        assert (inputs[filler] == 0).all()
        return
    counts = np.bincount(inputs[filler], minlength=vocab)
    assert (abs(counts - filler.sum() / vocab) < 0.1 * filler.sum() / vocab).all()
    values = inputs[:, 1 : 2 * k : 2]  # (N, k)
    holds_a_value = (inputs[:, :, None] == values[:, None]).any(-1)  # (N, T)
    assert abs(holds_a_value[filler].mean() - k / vocab) < 0.02
    rows, positions = np.nonzero(scored)
    for side in (-1, 1):
        beside = positions + side
        inside = (beside >= 2 * k) & (beside < length)
        inside[inside] &= filler[rows[inside], beside[inside]]
        same = inputs[rows[inside], beside[inside]] == labels[rows[inside], positions[inside]]
        assert same.mean() < 1 / vocab + 0.03, side


def _train_recall(attention: dict, steps: int) -> float:
    """Accuracy on fresh examples of a tiny model trained for `steps` on MQAR with 2 pairs
    of 8 tokens in 8 positions (a query of 2 from prefix values of 4: chance 1/4)."""
    torch.manual_seed(0)
    mqar = {"vocab_size": 8, "num_kv_pairs": 2, "seq_len": 8, "block_size": 8}
    model = build_model(tiny_model_config(attention, vocab_size=8, max_seq_len=8, d_model=64))
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        output, labels = scored_forward(model, mqar_batch(*generate(seed=10 + step, n=64, **mqar)))
        loss = token_metrics(output.logits, labels)[0]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        output, labels = scored_forward(model.eval(), mqar_batch(*generate(seed=1, n=512, **mqar)))
    return float(token_metrics(output.logits, labels)[1])


def test_recall_is_learnable_by_attention_and_not_without_it():
    """Dot-product attention learns recall well beyond chance (1/4) and beyond picking one
    of the 2 prefix values (1/2); a model that sees only its token and the one before it
    (local_conv, kernel 2) stays at chance: the answer is in the prefix and nowhere else."""
    assert _train_recall({"name": "dot_product"}, steps=400) > 0.7
    assert _train_recall({"name": "local_conv", "conv_kernel": 2}, steps=200) < 0.35


def test_datamodule_serves_mqar_without_a_tokenizer(tmp_path):
    data = {"name": "mqar", "seq_len": 32, "block_size": 32, "batch_size": 16,
            "num_train_examples": 200, "num_val_examples": 50, "num_test_examples": 50}
    module = build_datamodule(data, {"name": "bpe"}, 0, tmp_path)  # tokenizer ignored
    module.prepare_data()
    module.setup("fit")
    assert module.tokenizer is None and module.vocab_size == 8192
    batch = next(iter(module.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == (16, 32)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    positions = batch["scored_positions"]  # (B, k): the labelled positions, in order
    assert positions.shape == (16, 4) and (positions.diff(dim=1) > 0).all()
    scored = torch.zeros_like(batch["labels"], dtype=torch.bool).scatter(1, positions, True)
    assert torch.equal(scored, batch["labels"] != IGNORE_INDEX)
    assert module.fingerprint["blocks"] == {"train": 200, "validation": 50, "test": 50}
    assert module.fingerprint["tokenizer_sha256"] is None
    splits = module.splits.datasets
    assert not torch.equal(splits["train"].inputs[:50], splits["validation"].inputs)
    again = build_datamodule(data, None, 0, tmp_path)
    again.setup("fit")
    assert again.fingerprint == module.fingerprint


@pytest.mark.parametrize(("change", "key", "says"), [
    ({"seq_len": 15, "block_size": 15}, "data.seq_len", "4 * num_kv_pairs = 16"),
    ({"vocab_size": 9}, "data.vocab_size", "2 * num_kv_pairs + 2 = 10"),
    ({"block_size": 128}, "data.block_size", "data.seq_len"),
    ({"power_a": 0.0}, "data.power_a", "power_a"),
    ({"num_kv_pairs": 0}, "data.num_kv_pairs", "num_kv_pairs"),
])
def test_bad_config_names_its_key(change, key, says):
    with pytest.raises(ConfigError) as error:
        CORPORA.parse({"name": "mqar", **change}, "data")
    assert error.value.key == key and says in str(error.value)


@pytest.mark.parametrize(("change", "message"), [
    ({"seq_len": 15, "block_size": 15},
     "data.seq_len=15 (the prefix holds 2 tokens per pair and each query needs its own pair "
     "of slots after it); allowed: >= 4 * num_kv_pairs = 16"),
    ({"vocab_size": 9},
     "data.vocab_size=9 (keys are distinct tokens in [1, vocab_size/2), values in "
     "[vocab_size/2, vocab_size)); allowed: >= 2 * num_kv_pairs + 2 = 10"),
    ({"power_a": 0.0}, "data.power_a=0.0; allowed: 0 < power_a"),
    ({"block_size": 128},
     "data.block_size=128 (an MQAR example is one block); allowed: = data.seq_len (64)"),
])
def test_config_errors_give_the_key_the_value_the_reason_and_what_is_allowed(change, message):
    with pytest.raises(ConfigError) as error:
        CORPORA.parse({"name": "mqar", **change}, "data")
    assert str(error.value) == f"invalid config {message}"


def test_yaml_block_size_follows_seq_len():
    node = OmegaConf.load(CONF_DIR / "data" / "mqar.yaml")
    node.seq_len = 128
    config = CORPORA.parse(node, "data")
    assert config.block_size == config.seq_len == 128 and not config.uses_tokenizer


def mqar_batch(inputs: np.ndarray, labels: np.ndarray) -> dict[str, torch.Tensor]:
    dataset = MQARDataset(inputs, labels)
    return default_collate([dataset[i] for i in range(len(dataset))])


@pytest.mark.parametrize("head", [{"name": "linear"}, None])
def test_scored_positions_loss_and_gradients_equal_the_full_logits(head):
    """The module's loss on the labelled positions' logits only equals the loss over all
    positions' logits with the others ignored, in value and in every parameter's gradient."""
    torch.manual_seed(0)
    config = tiny_model_config(vocab_size=40, head=head or moa_head())
    model = build_model(config).double()
    inputs, labels = generate(n=6, vocab_size=40, num_kv_pairs=3, seq_len=24, block_size=24)
    batch = mqar_batch(inputs, labels)
    output, scored_labels = scored_forward(model, batch)
    assert output.logits.shape == (6, 3, 40) and (scored_labels != IGNORE_INDEX).all()
    loss, acc, count = token_metrics(output.logits, scored_labels)
    scored_grads = torch.autograd.grad(loss, list(model.parameters()))

    full = model(batch["input_ids"])
    full_loss, full_acc, full_count = token_metrics(full.logits, batch["labels"])
    full_grads = torch.autograd.grad(full_loss, list(model.parameters()))
    torch.testing.assert_close(loss, full_loss)
    assert acc == full_acc and count == full_count == 18
    for scored_grad, full_grad in zip(scored_grads, full_grads, strict=True):
        torch.testing.assert_close(scored_grad, full_grad)


@pytest.mark.parametrize("field", ["num_train_examples", "num_val_examples", "num_test_examples"])
def test_each_split_needs_an_example(field):
    with pytest.raises(ConfigError) as error:
        CORPORA.parse({"name": "mqar", field: 0}, "data")
    assert str(error.value) == f"invalid config data.{field}=0; allowed: 1 <= {field}"
    assert getattr(CORPORA.parse({"name": "mqar", field: 1}, "data"), field) == 1
