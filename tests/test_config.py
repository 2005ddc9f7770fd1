"""Every YAML under conf/ composes and validates; bad configs fail naming their key."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from moa.errors import ConfigError
from moa.training.run_config import parse_run
from tests.conftest import CONF_DIR

# Groups whose files are chosen as `group=name`; hydra/ and paths/ are merged into every run.
ALWAYS_LOADED = {"hydra", "paths"}
# Groups outside train.yaml's defaults (an experiment preset's own): added as `+group=name`.
APPENDED = {"mqar_width"}


def _choices() -> list[str]:
    overrides = []
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        group = path.parent.relative_to(CONF_DIR).as_posix()
        if group == "." or group in ALWAYS_LOADED:
            continue
        overrides.append(f"{'+' if group in APPENDED else ''}{group}={path.stem}")
    return overrides


def test_the_walk_finds_every_group():
    groups = {choice.split("=")[0] for choice in _choices()}
    assert {"model", "attention", "ffn", "position", "norm", "data", "tokenizer", "trainer",
            "logger", "callbacks", "optim", "sampling", "debug", "experiment"} <= groups


# Choices that need a value only the user can give; without it they must name the key.
REQUIRED = {
    "data=hf": ("data.path", "some-user/some-dataset"),
    "data=text_files": ("data.train_files", "/some/corpus/*.txt"),
    "data=chat": ("data.files", "/some/conversations.jsonl"),
    "data=interactions": ("data.files", "/some/conversations.jsonl"),
    "tokenizer=pretrained": ("tokenizer.path", "/some/tokenizer.json"),
}


@pytest.mark.parametrize("choice", _choices())
def test_every_config_file_composes_and_validates(compose_config, choice):
    required = REQUIRED.get(choice)
    if required is not None:
        with pytest.raises(ConfigError) as error:
            parse_run(compose_config(choice))
        assert error.value.key == required[0]
    extra = [f"{required[0]}={required[1]}"] if required else []
    spec = parse_run(compose_config(choice, *extra))
    assert spec.model.d_model % spec.model.n_heads == 0


@pytest.mark.parametrize("model", sorted(path.stem for path in (CONF_DIR / "model").glob("*.yaml")))
def test_model_sizes_give_their_table_rows(compose_config, model):
    """Each `model.size` gives the model the values of its row in the preset's `sizes`
    table (its own or the one it takes from gpt), and the sizes grow: tiny < small < card."""
    table = compose_config(f"model={model}").model.sizes
    widths = []
    for size in ("tiny", "small", "card"):
        spec = parse_run(compose_config(f"model={model}", f"model.size={size}")).model
        assert spec.size == size
        for key in ("d_model", "n_layers", "n_heads", "max_seq_len"):
            assert getattr(spec, key) == table[size][key], (size, key)
        if table[size].get("vocab_size") is not None:
            assert spec.vocab_size == table[size].vocab_size
        widths.append(spec.d_model * spec.n_layers)
    assert widths == sorted(set(widths))


def test_eval_config_composes(compose_config):
    cfg = compose_config("run_dir=/some/run", config_name="eval")
    assert cfg.run_dir == "/some/run" and cfg.checkpoint == "best"


def test_eval_runs_in_its_own_directory():
    """eval.py's hydra.run.dir is outputs/eval/..., not hydra/default's training directory."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="eval", return_hydra_config=True)
    run_dir = OmegaConf.to_container(cfg.hydra.run)["dir"]
    assert run_dir.startswith("${paths.root_dir}/outputs/eval/")
    GlobalHydra.instance().clear()


def test_model_preset_picks_groups_and_command_line_wins(compose_config):
    gpt2 = parse_run(compose_config("model=gpt2"))
    assert (gpt2.model.position.name, gpt2.model.norm.name, gpt2.model.ffn.name) == \
        ("learned", "layernorm", "mlp")
    override = parse_run(compose_config("model=gpt2", "position=rope", "attention=mqa"))
    assert override.model.position.name == "rope"
    assert override.model.attention.n_kv_heads == 1


def test_sqa_takes_half_the_query_heads(compose_config):
    spec = parse_run(compose_config("attention=sqa", "model.n_heads=8"))
    assert spec.model.attention.layout(spec.model) == (4, 4)


def test_head_dim_frees_n_heads_from_dividing_d_model(compose_config):
    spec = parse_run(compose_config("model=gpt", "model.size=tiny", "model.n_heads=3",
                                    "model.head_dim=16"))
    assert (spec.model.d_model, spec.model.n_heads, spec.model.head_dim) == (64, 3, 16)
    derived = parse_run(compose_config("model=gpt", "model.size=tiny"))
    assert derived.model.head_dim == 64 // 4


@pytest.mark.parametrize("model", sorted(path.stem for path in (CONF_DIR / "model").glob("*.yaml")))
def test_every_model_key_can_be_overridden(compose_config, model):
    """Each field of ModelConfig is in every model preset's composed config, so
    `model.KEY=value` works without Hydra's `+` (card_config: the MoA card presets' own)."""
    import dataclasses

    from moa.config import COMPONENTS, ModelConfig

    cfg = compose_config(f"model={model}")
    fields = {field.name for field in dataclasses.fields(ModelConfig)} - set(COMPONENTS)
    assert fields - set(cfg.model) <= {"card_config"}


INVALID = [
    (["model.n_heads=5"], "model.n_heads", "or set model.head_dim"),
    (["model.head_dim=0"], "model.head_dim", "a positive integer"),
    (["model=gpt", "attention=gqa", "attention.n_kv_heads=3"], "attention.n_kv_heads",
     "divisors"),
    (["model=gpt", "attention.n_q_heads=16"], "attention.n_q_heads", "more query heads"),
    (["model.vocab_size=100"], "model.vocab_size", "tokenizer"),
    (["model.size=huge"], "model.size", "card | small | tiny"),
    (["model.d_model=abc"], "model.d_model", "int"),
    (["+model.n_head=4"], "model.n_head", "did you mean 'n_heads'"),
    (["optim.lr=-1"], "optim.lr", "positive"),
    (["model.dropout=1.5"], "model.dropout", "dropout < 1.0"),
    (["attention.name=flash"], "attention.name", "dot_product"),
    (["norm.name=batchnorm"], "norm.name", "layernorm | rmsnorm"),
    (["+trainer.max_stepz=3"], "trainer.max_stepz", "unknown key"),
    (["data.block_size=100000"], "data.block_size", "max_seq_len"),
    (["sampling.top_p=1.5"], "sampling.top_p", "top_p <= 1.0"),
    (["optim.schedule=linear"], "optim.schedule", "cosine | constant"),
    (["+bogus=1"], "bogus", "unknown key"),
    (["attention=moa", "router=topk", "router.router_topk=5"], "attention.router.router_topk",
     "the number of paths"),
    (["optim.nonfinite_patience=0"], "optim.nonfinite_patience", "a positive integer"),
]


@pytest.mark.parametrize("overrides,key,allowed", INVALID, ids=[case[1] for case in INVALID])
def test_invalid_config_names_its_key(compose_config, overrides, key, allowed):
    with pytest.raises(ConfigError) as error:
        parse_run(compose_config(*overrides))
    assert error.value.key == key
    message = str(error.value)
    assert message.startswith(f"invalid config {key}=") and allowed in message
    assert "\n" not in message


def test_unknown_override_is_refused_by_hydra(compose_config):
    with pytest.raises(ConfigCompositionException, match="model.n_head"):
        compose_config("model.n_head=4")


# Every value a user can set is checked: a boolean key refuses `maybe`, an integer key a
# word, each naming its key. The walk reads the composed configs, so a new key or group
# is covered without being listed here.
def _typed_leaves(node, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, a wrong value) for every boolean and integer leaf under `node`."""
    found = []
    for name in node:
        if not prefix and name == "hydra":
            continue
        child, key = node._get_node(name), f"{prefix}{name}"
        if OmegaConf.is_dict(child):
            found += _typed_leaves(child, f"{key}.")
        elif not OmegaConf.is_list(child) and not child._is_interpolation():
            value = child._value()
            if isinstance(value, bool):
                found.append((key, "maybe"))
            elif isinstance(value, int):
                found.append((key, "abc"))
    return found


def _refuses_each(cfg, leaves, check) -> list[str]:
    """The keys whose wrong value `check(cfg)` accepts or refuses under another key."""
    wrong = []
    for key, bad in leaves:
        good = OmegaConf.select(cfg, key)
        OmegaConf.update(cfg, key, bad)
        try:
            check(cfg)
            wrong.append(f"{key}={bad} accepted")
        except ConfigError as error:
            # a group read through another section's interpolation (`attention.router:
            # ${router}`) is named where it is used (attention.router.router_topk), with
            # the value given
            named = error.key == key or error.key.endswith(f".{key}") or error.value == bad
            if not named or "\n" in str(error):
                wrong.append(f"{key}={bad} refused as {error.key}: {error}")
        finally:
            OmegaConf.update(cfg, key, good)
    return wrong


def test_every_boolean_and_integer_of_the_training_config_is_checked(compose_config):
    cfg = compose_config()
    leaves = _typed_leaves(cfg)
    assert {("evaluate", "maybe"), ("seed", "abc"), ("trainer.max_steps", "abc"),
            ("callbacks.model_checkpoint.save_last", "maybe")} <= set(leaves)
    assert _refuses_each(cfg, leaves, parse_run) == []


@pytest.mark.slow
@pytest.mark.parametrize("choice", _choices())
def test_every_boolean_and_integer_of_every_group_option_is_checked(compose_config, choice):
    required = REQUIRED.get(choice)
    cfg = compose_config(choice, *([f"{required[0]}={required[1]}"] if required else []))
    group = choice.lstrip("+").split("=")[0]
    if group not in cfg:
        pytest.skip(f"{group} presets set other groups' keys (walked with those groups)")
    assert _refuses_each(cfg, _typed_leaves(cfg[group], f"{group}."), parse_run) == []


@pytest.mark.parametrize("config_name", ["eval", "export"])
def test_every_boolean_and_integer_of_eval_and_export_is_checked(compose_config, tmp_path,
                                                                 config_name):
    from moa.hf.export import export
    from moa.training import evaluate

    extra = f"out={tmp_path / 'out'}" if config_name == "export" else "attention_override=alcca"
    cfg = compose_config(f"run_dir={tmp_path / 'no-run'}", extra, config_name=config_name)
    leaves = _typed_leaves(cfg)
    assert leaves, "nothing to walk"
    assert _refuses_each(cfg, leaves, evaluate if config_name == "eval" else export) == []


RANGES = [
    ("trainer.max_steps=0", "trainer.max_steps", "a positive number of optimizer steps"),
    ("trainer.max_steps=-5", "trainer.max_steps", "or -1"),
    ("trainer.devices=abc", "trainer.devices", "auto, a positive count"),
    ("trainer.accelerator=tpu9", "trainer.accelerator", "auto | cpu"),
    ("trainer.limit_val_batches=1.5", "trainer.limit_val_batches", "a fraction in [0, 1]"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches", "positive"),
    ("trainer.precision=33", "trainer.precision", "32-true"),
    ("callbacks.model_checkpoint.mode=low", "callbacks.model_checkpoint.mode", "min | max"),
    ("callbacks.throughput.window_size=0", "callbacks.throughput.window_size", "positive"),
    ("seed=-1", "seed", "[0, 2**32)"),
    ("seed=1.5", "seed", "[0, 2**32)"),
    ("resume=maybe", "resume", "false | true | auto"),
    ("ckpt_path=''", "ckpt_path", "a checkpoint file"),
    ("model.sizes.card.d_model=wide", "model.sizes.card.d_model", "model.d_model's type"),
]


@pytest.mark.parametrize("override,key,allowed", RANGES, ids=[case[0] for case in RANGES])
def test_values_with_a_range_are_refused_outside_it(compose_config, override, key, allowed):
    with pytest.raises(ConfigError) as error:
        parse_run(compose_config(override))
    assert error.value.key == key and allowed in str(error.value)
