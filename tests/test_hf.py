"""Hugging Face interop (moa.hf.modeling, moa.export): generate() with our cache equals recomputing
and our own decoding for every scheme, left padding, and the export round trip."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from moa.errors import ConfigError  # noqa: E402
from moa.hf.export import export  # noqa: E402
from moa.hf.modeling import CACHE_ARGUMENT, MoaCache, MoaConfig, MoaForCausalLM  # noqa: E402
from moa.models.generation import SamplingConfig, generate  # noqa: E402
from moa.params import model_config  # noqa: E402
from moa.training import evaluate, train  # noqa: E402
from moa.training.objectives import token_metrics  # noqa: E402
from tests.conftest import ROOT, assert_next_token_depends_on_context  # noqa: E402

SCHEMES = ["mha", "gqa", "mqa", "sqa", "metric", "metric_mqa", "alcca", "local_conv",
           "channel_mix", "moas", "moas_static", "moa"]
PRESETS = ["gpt", "moas", "moa_metric", "discoverlm"]
CASES = [["model=gpt", f"attention={scheme}"] for scheme in SCHEMES] + [
    [f"model={preset}"] for preset in PRESETS]
PAD = 0


def tiny_hf_model(overrides: list[str]) -> MoaForCausalLM:
    """A random-init tiny model (byte vocabulary) behind the transformers wrapper, with
    weights large enough (init_std 0.3) that its greedy output depends on the context: at
    0.02 the last token alone decides it, and a cache or padding path that loses the
    context generates the same tokens."""
    config = model_config([*overrides, "model.size=tiny", "tokenizer=byte", "model.init_std=0.3"])
    torch.manual_seed(0)
    return MoaForCausalLM(MoaConfig.from_model_config(config, pad_token_id=PAD)).eval()


def ids_for_context() -> torch.Tensor:
    return torch.randint(3, 200, (16, 6), generator=torch.Generator().manual_seed(1))


def greedy(model: MoaForCausalLM, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=10, do_sample=False, **kwargs)


@pytest.mark.parametrize("overrides", CASES, ids=lambda o: o[-1].split("=")[1])
def test_cached_generate_equals_uncached_and_ours(overrides):
    model = tiny_hf_model(overrides)
    if overrides[-1] == "attention=channel_mix":  # mixes no positions: nothing to cache
        with pytest.raises(AssertionError):
            assert_next_token_depends_on_context(lambda x: model(x).logits, ids_for_context())
    else:
        assert_next_token_depends_on_context(lambda x: model(x).logits, ids_for_context())
    ids = torch.randint(3, 200, (2, 6))
    cached = greedy(model, ids, use_cache=True)
    assert cached.shape == (2, 16)
    assert torch.equal(cached, greedy(model, ids, use_cache=False))
    ours = generate(model.model, ids, SamplingConfig(max_new_tokens=10, temperature=0.0))
    assert torch.equal(cached, ours)


@pytest.mark.parametrize("overrides", [["model=gpt", "position=learned"],
                                       ["model=gpt", "attention=local_conv"],
                                       ["model=moa_metric"]], ids=lambda o: o[-1])
def test_left_padded_row_generates_what_it_generates_alone(overrides):
    model = tiny_hf_model(overrides)
    assert_next_token_depends_on_context(lambda x: model(x).logits, ids_for_context())
    long, short = torch.randint(3, 200, (1, 9)), torch.randint(3, 200, (1, 5))
    batch = torch.cat([long, torch.cat([torch.full((1, 4), PAD), short], dim=1)])
    mask = (torch.arange(9) >= torch.tensor([[0], [4]])).long()  # (2, 9), left padding
    for use_cache in (True, False):
        out = greedy(model, batch, attention_mask=mask, use_cache=use_cache)
        assert torch.equal(out[0], greedy(model, long)[0])
        assert torch.equal(out[1, 4:], greedy(model, short)[0])


def test_a_reset_cache_generates_as_a_fresh_one():
    model = tiny_hf_model(["model=moa_metric"])
    ids = torch.randint(3, 200, (2, 6))
    cache = MoaCache(model.model, batch_size=2, per_row=False)
    first = greedy(model, ids, **{CACHE_ARGUMENT: cache})
    assert cache.get_seq_length() == first.size(1) - 1  # the last token is not fed back
    cache.reset()
    assert torch.equal(greedy(model, ids, **{CACHE_ARGUMENT: cache}), first)
    assert torch.equal(first, greedy(model, ids))


def test_forward_takes_the_cache_under_either_name_and_returns_it_under_the_installed_one():
    model = tiny_hf_model(["model=moa_metric"])
    ids = torch.randint(3, 200, (1, 7))
    whole = model(ids).logits[:, -1]
    for name in ("cache", "past_key_values"):
        cache = getattr(model(ids[:, :6]), CACHE_ARGUMENT)
        assert isinstance(cache, MoaCache) and cache.get_seq_length() == 6
        step = model(ids[:, 6:], **{name: cache}).logits[:, -1]
        torch.testing.assert_close(step, whole, rtol=1e-4, atol=1e-5)
    first, second = (MoaCache(model.model, 1, per_row=False) for _ in range(2))
    with pytest.raises(ValueError, match="not both"):
        model(ids, cache=first, past_key_values=second)


def test_padding_on_the_right_is_refused():
    model = tiny_hf_model(["model=gpt"])
    mask = torch.tensor([[1, 1, 1, 0]])
    with pytest.raises(ValueError, match="only left padding"):
        model(torch.randint(3, 200, (1, 4)), attention_mask=mask)


def test_beam_search_is_refused_with_a_clear_error():
    model = tiny_hf_model(["model=gpt"])
    with pytest.raises(ValueError, match="beam search"):
        model.generate(torch.randint(3, 200, (1, 6)), num_beams=2, max_new_tokens=4)


def test_sampling_options_follow_the_seed_and_top_k_one_is_greedy():
    model = tiny_hf_model(["model=moa_metric"])
    ids = torch.randint(3, 200, (2, 6))
    options = {"do_sample": True, "temperature": 1.5, "top_p": 0.95, "max_new_tokens": 10}
    runs = []
    for use_cache in (True, False, True):
        torch.manual_seed(7)
        runs.append(model.generate(ids, use_cache=use_cache, **options))
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    assert not torch.equal(runs[0], greedy(model, ids))  # sampling at t=1.5 wanders off
    top_one = model.generate(ids, do_sample=True, top_k=1, max_new_tokens=10)
    assert torch.equal(top_one, greedy(model, ids))


def test_export_round_trip(compose_config, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "exported"
    trained, objects = train(compose_config("trainer=smoke", "model=moa_metric", "tokenizer=byte",
                                      "trainer.max_steps=6", "sampling.prompts=[]"))
    ours = objects["module"].model.eval()
    exported = subprocess.run([sys.executable, "-m", "moa.export", f"run_dir={run_dir}",
                               f"out={out}", f"hydra.run.dir={tmp_path / 'export-log'}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr[-2000:]

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert isinstance(model, MoaForCausalLM)
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode("To be, or not")]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
        loss = token_metrics(ours(ids).logits[:, :-1], ids[:, 1:])[0]
        torch.testing.assert_close(model(ids, labels=ids).loss, loss)
    expected = generate(ours, ids, SamplingConfig(max_new_tokens=12, temperature=0.0))
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), expected)

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "think", "content": "x"},
                {"role": "reasoning", "content": "y"}, {"role": "user", "content": "Why?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|bos|><|system|>Be brief.<|user|>Hi<|assistant|>Hello<|eos|>"
                    "<|think|>x<|reasoning|>y<|user|>Why?<|assistant|>")
    chat_ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    role_ids = {tokenizer.convert_tokens_to_ids(f"<|{m['role']}|>") for m in messages}
    assert role_ids <= set(chat_ids) and tokenizer.unk_token_id not in role_ids
    for name in ("config.json", "generation_config.json", "model.safetensors",
                 "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (out / name).is_file(), name
    umask = os.umask(0)
    os.umask(umask)
    assert {path.name: path.stat().st_mode & 0o777 for path in out.iterdir()} == {
        path.name: 0o666 & ~umask for path in out.iterdir()}  # the weights as the rest
    assert "val_loss" in (out / "README.md").read_text()

    metrics, _ = evaluate(compose_config(f"run_dir={out}", "trainer=smoke",
                                         "sampling.prompts=[]", config_name="eval"))
    assert metrics == pytest.approx(trained, rel=1e-4)  # the same weights, splits and batches


def test_export_never_writes_into_a_run_and_replaces_only_with_overwrite(compose_config,
                                                                          tmp_path):
    run_dir = tmp_path / "run"
    train(compose_config("trainer=smoke", "model=gpt", "tokenizer=byte", "model.n_layers=1",
                         "trainer.max_steps=2", "trainer.val_check_interval=2", "evaluate=false"))
    run_files = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}

    def export_to(out, *overrides):
        return export(compose_config(f"run_dir={run_dir}", "checkpoint=last", f"out={out}",
                                     *overrides, config_name="export"))

    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    refused = {run_dir: "is a run directory", run_dir / "hf": "is a run directory",
               run_dir / "checkpoints": "is a run directory", a_file: "a file is there",
               other: "holds other files"}
    for out, why in refused.items():
        for overwrite in ("overwrite=false", "overwrite=true"):
            with pytest.raises(ConfigError, match=why) as error:
                export_to(out, overwrite)
            assert error.value.key == "out"
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == run_files
    assert a_file.read_text() == "mine" and [p.name for p in other.iterdir()] == ["notes.txt"]

    out = tmp_path / "exported"
    export_to(out)
    (out / "stale.txt").write_text("from before")
    with pytest.raises(ConfigError, match="overwrite=true"):
        export_to(out)
    assert (out / "stale.txt").is_file()  # refused: nothing replaced
    export_to(out, "overwrite=true")
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


def test_export_without_out_names_the_key(compose_config, tmp_path):
    with pytest.raises(ConfigError) as error:
        export(compose_config(f"run_dir={tmp_path}", config_name="export"))
    assert error.value.key == "out"


@pytest.mark.parametrize("first", ["transformers", "moa.hf.modeling"])
def test_import_moa_registers_when_transformers_is_imported_and_not_before(first):
    """`import moa` stays free of transformers' import cost; importing transformers after
    it registers model_type moa_metric with the Auto classes all the same, also when the
    first import is of moa.hf.modeling, which imports transformers half-way through."""
    script = (
        "import sys, moa\n"
        "assert 'transformers' not in sys.modules\n"
        f"import {first}\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "config = AutoConfig.for_model('moa_metric')\n"
        "print(type(config).__name__, AutoModelForCausalLM._model_mapping[type(config)].__name__)"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, check=True)
    assert result.stdout.split() == ["MoaConfig", "MoaForCausalLM"]
