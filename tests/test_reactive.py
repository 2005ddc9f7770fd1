"""The Reactive Transformer (moa/models/reactive/): the encoder is bidirectional, the
decoder causal, batch rows never share memory, the STM changes only through the gated
memory attention and stays bounded, cached generation equals uncached, every part gets
gradients, and bad configs fail naming their key. Tiny models in float64."""

from __future__ import annotations

import pytest
import torch

from moa.config import ModelConfig
from moa.errors import ConfigError
from moa.models.generation import SamplingConfig
from moa.models.language_model import build_model
from moa.models.reactive import ReactiveTransformer

V = 40
DOT = {"name": "dot_product", "n_q_heads": 2, "n_kv_heads": 1}
METRIC = {"name": "metric", "n_q_heads": 2, "n_kv_heads": 1, "impl": "cpu_fused"}


def reactive_config(attention: dict | None = None, **model) -> ModelConfig:
    sections = {"architecture": "reactive", "d_model": 32, "n_layers": 2, "n_heads": 4,
                "vocab_size": V, "max_seq_len": 48, "stm_slots": 6, "end_id": 1, "pad_id": 0,
                "decoder_attention": DOT, "cross_attention": DOT, **model}
    return ModelConfig.from_sections(
        sections, attention=attention or {"name": "dot_product", "n_q_heads": 2},
        ffn={"name": "swiglu", "hidden_dim": 64}, position={"name": "rope"},
        norm={"name": "rmsnorm"})


def tiny(seed: int = 0, **model) -> ReactiveTransformer:
    torch.manual_seed(seed)
    built = build_model(reactive_config(**model)).double().eval()
    assert isinstance(built, ReactiveTransformer)
    with torch.no_grad():  # a non-trivial memory gate and initial STM to test against
        built.stm_init.normal_()
    return built


def ids(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, V, shape, generator=torch.Generator().manual_seed(seed))


def random_memory(model: ReactiveTransformer, batch: int, seed: int = 2) -> torch.Tensor:
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(config.n_layers, batch, config.stm_slots, config.d_model,
                       generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("reads_memory", [True, False])
def test_encoder_is_bidirectional_and_ignores_padding(reads_memory):
    model = tiny(encoder_reads_memory=reads_memory)
    x = ids(2, 9)
    changed = x.clone()
    changed[:, -1] = (x[:, -1] + 1 - 2) % (V - 2) + 2  # a later token
    before, after = model.encode(x), model.encode(changed)
    assert (before.hidden[:, 0] - after.hidden[:, 0]).abs().max() > 1e-6
    assert (before.layers[0, :, 0] - after.layers[0, :, 0]).abs().max() > 1e-6
    assert before.layers.shape == (2, 2, 9, 32)
    pad_mask = torch.ones(2, 9, dtype=torch.bool)
    pad_mask[:, 6:] = False  # tokens after 6 are padding: whatever they are, nothing changes
    masked, masked_changed = model.encode(x, pad_mask), model.encode(changed, pad_mask)
    torch.testing.assert_close(masked.hidden[:, :6], masked_changed.hidden[:, :6])
    short = model.encode(x[:, :6])
    torch.testing.assert_close(masked.layers[:, :, :6], short.layers)


def test_encoder_reads_the_memory_only_where_configured():
    x = ids(1, 7)
    for reads_memory in (True, False):
        model = tiny(encoder_reads_memory=reads_memory)
        one, other = random_memory(model, 1, seed=3), random_memory(model, 1, seed=4)
        difference = (model.encode(x, memory=one).hidden
                      - model.encode(x, memory=other).hidden).abs().max()
        assert (difference > 1e-6) == reads_memory
        assert (model.encoder.blocks[0].cross_attention is not None) == reads_memory


@pytest.mark.parametrize("cross", [DOT, METRIC])
def test_decoder_is_causal(cross):
    model = tiny(cross_attention=cross)
    memory = random_memory(model, 2)
    x = ids(2, 10)
    future = x.clone()
    future[:, 6:] = ids(2, 4, seed=9)
    torch.testing.assert_close(model.decode(x, memory)[:, :6], model.decode(future, memory)[:, :6])
    assert (model.decode(x, memory)[:, 6:] - model.decode(future, memory)[:, 6:]).abs().max() > 1e-6


def test_batch_rows_never_share_memory():
    model = tiny(memory_attention={"variant": "interlayer", "gate": "linear"})
    x, memory = ids(3, 8), random_memory(model, 3)
    logits = model.decode(x, memory)
    encoded = model.encode(x, memory=memory)
    written = model.update_memory(memory, encoded.layers)
    for row in range(3):
        alone = slice(row, row + 1)
        torch.testing.assert_close(logits[alone], model.decode(x[alone], memory[:, alone]))
        torch.testing.assert_close(encoded.hidden[alone],
                                   model.encode(x[alone], memory=memory[:, alone]).hidden)
        torch.testing.assert_close(written[:, alone], model.update_memory(
            memory[:, alone], model.encode(x[alone], memory=memory[:, alone]).layers))
    other = memory.clone()
    other[:, 1:] = random_memory(model, 2, seed=7)  # other rows' memory: row 0 unchanged
    torch.testing.assert_close(model.decode(x, other)[0], logits[0])
    answers, new_memory = model.interact(x, other, max_new_tokens=4)
    answers_0, new_memory_0 = model.interact(x[:1], other[:, :1], max_new_tokens=4)
    torch.testing.assert_close(new_memory[:, :1], new_memory_0)
    assert torch.equal(answers[:1, :answers_0.size(1)], answers_0)


@pytest.mark.parametrize("memory_attention", [{"variant": "simple", "gate": "slot"},
                                              {"variant": "interlayer", "gate": "linear"}])
def test_memory_changes_only_through_the_memory_attention_and_stays_bounded(memory_attention):
    model = tiny(memory_attention=memory_attention)
    memory = model.initial_memory(2, dtype=torch.float64)
    start = memory.clone()
    x = ids(2, 6)
    model.decode(x, memory)
    model.respond(x, memory, max_new_tokens=3)
    model.encode(x, memory=memory)
    assert torch.equal(memory, start)  # reading never writes
    answer, written = model.interact(x, memory, max_new_tokens=3)
    interaction = torch.cat([x, answer], dim=1)
    pad_mask = torch.cat([torch.ones_like(x, dtype=torch.bool), model.answer_mask(answer)], 1)
    expected = model.update_memory(memory, model.encode(interaction, pad_mask, memory).layers,
                                   pad_mask)
    torch.testing.assert_close(written, expected)
    # 100 turns of large random encodings: each slot is a convex mix of its old value and
    # the attention's update, so it never leaves the largest of those seen.
    generator = torch.Generator().manual_seed(5)
    bound = memory.abs().amax()
    with torch.no_grad():
        for _ in range(100):
            encoded = 50 * torch.randn(2, 2, 7, 32, generator=generator, dtype=torch.float64)
            updates = [write.read(memory[layer] if write.interlayer is None
                                  else memory[layer] + write.interlayer(
                                      memory[layer], memory.mean(0), None),
                                  encoded[layer], None)
                       for layer, write in enumerate(model.memory_attention.layers)]
            bound = torch.maximum(bound, torch.stack(updates).abs().amax())
            memory = model.update_memory(memory, encoded)
            assert memory.abs().amax() <= bound + 1e-9
    assert torch.isfinite(memory).all() and bound < 1e3


@pytest.mark.parametrize("cross", [DOT, METRIC])
def test_cached_generation_equals_uncached(cross):
    model = tiny(cross_attention=cross, end_id=None)
    memory, prompt = random_memory(model, 2), ids(2, 5)
    answer = model.respond(prompt, memory, max_new_tokens=6)
    sequence = prompt
    for _ in range(6):  # greedy without a cache: the whole sequence each step
        sequence = torch.cat([sequence, model.decode(sequence, memory)[:, -1:].argmax(-1)], 1)
    assert torch.equal(answer, sequence[:, 5:])
    cache = model.new_cache()
    steps = [model.decode(sequence[:, :5], memory, cache=cache)]
    steps += [model.decode(sequence[:, t:t + 1], memory, cache=cache) for t in range(5, 11)]
    torch.testing.assert_close(torch.cat(steps, 1), model.decode(sequence, memory))


@pytest.mark.slow
def test_compiled_decoding_answers_as_eager():
    """`sampling.compile` (inductor) on the decoder's one-token steps: the same answer."""
    model = tiny(cross_attention=METRIC, end_id=None)
    memory, prompt = random_memory(model, 2), ids(2, 5)
    greedy = SamplingConfig(temperature=0.0)
    assert torch.equal(model.respond(prompt, memory, 8, SamplingConfig(temperature=0.0,
                                                                       compile=True)),
                       model.respond(prompt, memory, 8, greedy))


def test_the_memory_is_projected_once_per_turn():
    model = tiny()
    calls = []
    projection = model.decoder.blocks[0].cross_attention.heads.kv
    handle = projection.register_forward_hook(lambda *args: calls.append(args[1][0].shape))
    model.respond(ids(1, 4), random_memory(model, 1), max_new_tokens=5)
    handle.remove()
    assert calls == [torch.Size([1, 6, 32])]  # the 6 slots, once for 5 tokens


def test_respond_stops_each_row_at_its_end_and_pads_after_it():
    model = tiny(end_id=None)
    memory, prompt = random_memory(model, 2), ids(2, 4)
    free = model.respond(prompt, memory, max_new_tokens=6)
    model.config.end_id = int(free[0, 0])  # row 0 ends at its first token
    stopped = model.respond(prompt, memory, max_new_tokens=6)
    first_end = (free[1] == model.config.end_id).nonzero()
    row_1_end = int(first_end[0]) if len(first_end) else 5
    assert stopped[0, 0] == free[0, 0] and (stopped[0, 1:] == model.config.pad_id).all()
    assert torch.equal(stopped[1, :row_1_end + 1], free[1, :row_1_end + 1])
    assert stopped.size(1) == row_1_end + 1  # generation stops once every row has ended
    assert model.answer_mask(stopped)[0].tolist() == [True] + [False] * row_1_end


@pytest.mark.parametrize("memory_attention", [{"variant": "simple", "gate": "slot"},
                                              {"variant": "interlayer", "gate": "linear"}])
def test_gradients_reach_every_part(memory_attention):
    model = tiny(memory_attention=memory_attention, cross_attention=METRIC).train()
    x = ids(2, 8)
    memory = model.initial_memory(2, dtype=torch.float64)
    encoded = model.encode(x, memory=memory)
    written = model.update_memory(memory, encoded.layers)
    loss = (model.mlm_logits(encoded.hidden).logsumexp(-1).mean()
            + model.decode(x, written).logsumexp(-1).mean())
    loss.backward()
    missing = [name for name, p in model.named_parameters()
               if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_joint_pretraining_reads_the_encoders_layers_with_a_mask():
    model = tiny()
    x = ids(2, 9)
    pad_mask = torch.ones(2, 9, dtype=torch.bool)
    pad_mask[1, 5:] = False
    encoded = model.encode(x, pad_mask)
    logits = model.decode(x, encoded.layers.detach(), memory_mask=pad_mask)
    noise = encoded.layers.detach().clone()
    noise[:, 1, 5:] = 1e3  # masked memory entries: no effect
    torch.testing.assert_close(model.decode(x, noise, memory_mask=pad_mask), logits)


def test_initial_memory_is_near_zero_and_the_same_for_every_row():
    torch.manual_seed(0)
    model = build_model(reactive_config(stm_init_std=0.02))
    memory = model.initial_memory(3)
    assert memory.shape == (2, 3, 6, 32)
    assert torch.equal(memory[:, 0], memory[:, 2]) and memory.abs().max() < 0.2
    assert "stm_init" in model.state_dict()


@pytest.mark.parametrize(("model", "attention", "key"), [
    ({"cross_attention": {"name": "local_conv"}}, None, "model.cross_attention.name"),
    ({"cross_attention": {"name": "flash"}}, None, "model.cross_attention.name"),
    ({"cross_attention": {**DOT, "n_kv": 1}}, None, "model.cross_attention.n_kv"),
    ({"cross_attention": {**METRIC, "use_balls": True}}, None, "model.cross_attention.use_balls"),
    ({"decoder_attention": {"name": "dot_product", "n_kv_heads": 3}}, None,
     "model.decoder_attention.n_kv_heads"),
    ({"memory_attention": {"attention": {"name": "channel_mix"}}}, None,
     "model.memory_attention.attention.name"),
    ({"memory_attention": {"gate": "tanh"}}, None, "model.memory_attention.gate"),
    ({"memory_attention": {"variant": "deep"}}, None, "model.memory_attention.variant"),
    ({"stm_slots": 0}, None, "model.stm_slots"),
    ({"drop_path": 0.1}, None, "model.drop_path"),
    ({}, {"name": "alcca"}, "attention.name"),
    ({"architecture": "rnn"}, None, "model.architecture"),
])
def test_bad_config_names_its_key(model, attention, key):
    with pytest.raises(ConfigError) as error:
        reactive_config(attention, **model)
    assert error.value.key == key


def test_config_round_trips_through_its_dict():
    config = reactive_config(cross_attention=METRIC,
                             memory_attention={"variant": "interlayer", "gate": "linear"})
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert type(ModelConfig.from_dict(config.to_dict())).__name__ == "ReactiveConfig"


def test_each_attention_role_is_a_choice_of_the_attention_group(compose_config):
    """`attention@model.<role>=<scheme>` picks a role's scheme on the command line; each
    role keeps the card's head counts (cross-attention 4q/2kv, the others 4q/4kv of 8)."""
    from moa.training.run_config import parse_run

    spec = parse_run(compose_config("model=rxt_alpha_micro",
                                    "attention@model.cross_attention=metric",
                                    "attention@model.memory_attention.attention=mha",
                                    "model.memory_attention.variant=interlayer"))
    config = spec.model
    assert (config.cross_attention.name, config.cross_attention.n_q_heads,
            config.cross_attention.n_kv_heads) == ("metric", 4, 2)
    assert config.memory_attention.attention.name == "dot_product"
    assert config.memory_attention.attention.layout(config) == (4, 4)
    assert config.decoder_attention.layout(config) == (4, 4)
    assert config.attention.layout(config) == (4, 4)
    with pytest.raises(ConfigError) as error:
        parse_run(compose_config("model=rxt_alpha_micro",
                                 "attention@model.cross_attention=local_conv"))
    assert error.value.key == "model.cross_attention.name"
