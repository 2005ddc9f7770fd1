"""Shared fixtures: offline environment, Hydra composition, shared data location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Property tests explore shapes from a fixed seed (derandomize): the same examples on every
# run and machine, a bounded number of them, no example database written, no deadline
# (a first example pays for imports and compilation).
settings.register_profile("moa", derandomize=True, database=None, deadline=None,
                          max_examples=20, print_blob=True)
settings.load_profile("moa")

# Tests never reach the network nor prompt: set before any library reads them.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU, Triton kernels run in its interpreter. Triton reads this when first
# imported, which other libraries may do before any kernel test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The maintainers' small real datasets beside the project (never copied into it)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not present")
    return SHARED_DATA


def tiny_model_config(attention: dict | None = None, position: str = "rope", **model):
    """A small ModelConfig for unit tests; `attention`/`model` entries override."""
    from moa.config import ModelConfig

    sections = {"d_model": 32, "n_layers": 2, "n_heads": 4, "vocab_size": 50, "max_seq_len": 64}
    sections.update(model)
    components = {
        "attention": {"name": "dot_product", **(attention or {})},
        "ffn": {"name": "swiglu"},
        "position": {"name": position},
        "norm": {"name": "rmsnorm"},
    }
    return ModelConfig.from_sections(sections, **components)


def ball_keys(model: torch.nn.Module, ids: torch.Tensor
              ) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """(ball, its keys (B, H, S, D) on `ids`) for every ball-pruning module of `model`."""
    from moa.attention.balls import BallPruning

    balls = [m for m in model.modules() if isinstance(m, BallPruning)]
    seen: dict[int, torch.Tensor] = {}
    handles = [ball.register_forward_pre_hook(
        lambda module, args: seen.setdefault(id(module), args[0])) for ball in balls]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return [(ball, seen[id(ball)]) for ball in balls]


def radii_keeping(model: torch.nn.Module, ids: torch.Tensor, kept: float) -> None:
    """Each ball's origin moved off zero (cosine keys are all at distance 1 from zero) and
    its radius set to the `kept` quantile of its head's key distances on `ids`, layer by
    layer (the keys depend on the earlier layers' balls), so that about `kept` of the keys
    are inside: both the gate and the causal mask then decide some weights."""
    for ball, _ in ball_keys(model, ids):
        with torch.no_grad():
            ball.origin.normal_(0.0, 0.5)
        keys = dict((id(b), k) for b, k in ball_keys(model, ids))[id(ball)]
        distance = ball.distance(keys)  # (B, H, S)
        radius = distance.transpose(0, 1).flatten(1).quantile(kept, dim=1)
        with torch.no_grad():
            ball.log_radius.copy_(radius.log())


def pruned_fractions(model: torch.nn.Module, ids: torch.Tensor) -> list[float]:
    """The fraction of keys each ball prunes on `ids` (its logged stat)."""
    with torch.no_grad():
        stats = model(ids).stats
    return [float(v) for name, v in stats.items() if name.endswith("pruned_fraction")]


@pytest.fixture
def no_compiler(monkeypatch) -> None:
    """Every build of our C++ kernels fails, as where no compiler is found
    (`moa/kernels/extension.py`)."""
    import subprocess

    from moa.kernels import extension

    def failed_build(*args, **kwargs):
        raise subprocess.CalledProcessError(1, ["c++"])

    monkeypatch.setattr(extension, "load", failed_build)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache of built corpora and tokenizers for the whole session."""
    return Path(os.environ.get("MOA_TEST_CACHE_DIR") or tmp_path_factory.mktemp("moa-cache"))


@pytest.fixture
def compose_config(tmp_path, cache_dir):
    """Compose `conf/<config_name>.yaml` with overrides, the template's way: Hydra's own
    config returned and set, so `${hydra:...}` interpolations resolve; outputs in tmp_path."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    def _compose(*overrides: str, config_name: str = "train"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(
                config_name=config_name, return_hydra_config=True,
                overrides=[
                    f"paths.root_dir={ROOT}",
                    f"paths.output_dir={tmp_path / 'run'}",
                    f"paths.cache_dir={cache_dir}",
                    f"paths.shared_data_dir={SHARED_DATA}",
                    f"hydra.run.dir={tmp_path / 'run'}",
                    *overrides,
                ],
            )
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


def assert_same_outputs_and_gradients(actual, expected, inputs) -> None:
    """`actual == expected`, and so are the gradients of their squared sums with respect to
    every tensor in `inputs` (one either side leaves unused must be absent or zero)."""
    import torch

    torch.testing.assert_close(actual, expected)
    inputs = list(inputs)
    grads_actual = torch.autograd.grad(actual.square().sum(), inputs, allow_unused=True)
    grads_expected = torch.autograd.grad(expected.square().sum(), inputs, allow_unused=True)
    for got, want in zip(grads_actual, grads_expected, strict=True):
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want)


def metric_model_config(impl: str = "eager", **attention):
    """tiny_model_config with metric attention (`impl`, and `attention` overrides)."""
    return tiny_model_config({"name": "metric", "impl": impl, **attention})


def forward_context(config, T: int, record=None):
    """A fresh ForwardContext for positions 0..T-1 of a model with `config`, recording into
    `record` (an AuxiliaryRecorder; a fresh one if None)."""
    from moa.layers.auxiliary import AuxiliaryRecorder
    from moa.layers.context import ForwardContext
    from moa.layers.position import POSITION

    position = POSITION.build(config.position, config.max_seq_len, config.d_model, config.head_dim)
    return ForwardContext(torch.arange(T), position, record or AuxiliaryRecorder())


class PositionedAttention(torch.nn.Module):
    """An attention module of `config` with its positions as a model sees them:
    x (B, T, C) -> (B, T, C)."""

    def __init__(self, config):
        super().__init__()
        from moa.attention import ATTENTION

        self.config = config
        self.attention = ATTENTION.build(config.attention, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, forward_context(self.config, x.size(1)))


def metric_heads_reference(attention, x: torch.Tensor, ctx):
    """A metric attention's q, k (metric space, then rotated) and v (unscaled) from x:
    the q and kv projections apart, each map applied to their heads as written
    (`to_metric_space`), not folded into a stacked weight as the module does."""
    q, (k, v) = attention.heads.queries(x), attention.heads.keys_values(x)
    return (*ctx.position.rotate(*attention.to_metric_space(q, k), ctx.positions), v)


def assert_dropout_in_training_only(module, plain, x, ctx) -> None:
    """`module` (attention dropout on) equals `plain` (the same weights, no dropout) in
    evaluation and differs from it in training."""
    plain.load_state_dict(module.state_dict())
    expected = plain.eval()(x, ctx)
    torch.testing.assert_close(module.eval()(x, ctx), expected)
    assert not torch.allclose(module.train()(x, ctx), expected)


def assert_causal(module, config, T: int = 13, t: int = 6) -> None:
    """`module(x, ctx)` keeps x's shape, and new inputs after position t change no output
    at positions <= t (and do change later ones)."""
    x = torch.randn(2, T, config.d_model)
    y = module(x, forward_context(config, T))
    assert y.shape == x.shape
    changed = x.clone()
    changed[:, t + 1:] = torch.randn_like(changed[:, t + 1:])
    y_changed = module(changed, forward_context(config, T))
    torch.testing.assert_close(y_changed[:, : t + 1], y[:, : t + 1])
    assert not torch.allclose(y_changed[:, t + 1:], y[:, t + 1:])


def assert_next_token_depends_on_context(logits_of, ids: torch.Tensor,
                                        share: float = 0.5) -> None:
    """The greedy next token of `logits_of(ids)` (B, T, V) changes in more than `share` of
    the rows when each row's tokens but the last are the next row's: the model reads its
    context, so a cache or a padding path that lost it would change its output."""
    other = ids.clone()
    other[:, :-1] = ids[:, :-1].roll(1, dims=0)
    with torch.no_grad():
        changed = logits_of(ids)[:, -1].argmax(-1) != logits_of(other)[:, -1].argmax(-1)
    assert changed.float().mean() > share, f"{changed.float().mean():.2f} of rows changed"


def assert_cached_matches_full(model, ids, prefill: int = 3) -> None:
    """Logits of one full forward equal a prefill of `prefill` tokens, then one at a time."""
    full = model(ids).logits
    cache = model.new_cache()
    steps = [model(ids[:, :prefill], cache).logits]
    steps += [model(ids[:, t:t + 1], cache).logits for t in range(prefill, ids.size(1))]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def train_run(run_dir: Path, cache_dir: Path, *overrides: str) -> Path:
    """Train a run into `run_dir` outside the per-test fixtures (for module-scoped fixtures:
    one small trained run that several tests start from)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from moa.training import train

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=[
            f"paths.root_dir={ROOT}", f"paths.output_dir={run_dir}",
            f"paths.cache_dir={cache_dir}", f"paths.shared_data_dir={SHARED_DATA}",
            f"hydra.run.dir={run_dir}", *overrides])
    HydraConfig.instance().set_config(cfg)
    try:
        train(cfg)
    finally:
        GlobalHydra.instance().clear()
    return run_dir


RXT_WORDS = "hello there my name is ada what who are you the cat sat on a mat".split()


def word_tokenizer():
    """A word-level tokenizer of RXT_WORDS with ours and RxT's special tokens."""
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from moa.data.tokenizer import Tokenizer

    backend = Backend(WordLevel({word: i for i, word in enumerate(["<|unk|>", *RXT_WORDS])},
                                unk_token="<|unk|>"))
    backend.pre_tokenizer = Whitespace()
    backend.add_special_tokens(["[Q]", "[A]", "[MASK]"])
    return Tokenizer(backend)


@pytest.fixture
def rxt_run(tmp_path, compose_config) -> Path:
    """A tiny random RxT saved the way training saves a run: config.yaml, tokenizer.json
    (word_tokenizer) and checkpoints/last.ckpt."""
    from omegaconf import OmegaConf

    from moa.models.language_model import build_model
    from moa.models.weights_format import WEIGHTS_FORMAT
    from moa.training.run_config import parse_run, resolved
    from moa.training.run_files import WEIGHTS_PREFIX

    tokenizer = word_tokenizer()
    cfg = compose_config("model=rxt_alpha_micro", "model.size=tiny", "model.vocab_size=300",
                         "tokenizer.vocab_size=300")  # the words' ids and a padded rest
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({str(key): resolved(cfg, str(key)) for key in cfg
                                     if key != "hydra"}), run_dir / "config.yaml")
    tokenizer.save(run_dir / "tokenizer.json")
    torch.manual_seed(0)
    model = build_model(parse_run(cfg).model)
    torch.save({"moa_format_version": WEIGHTS_FORMAT, "model_config": model.config.to_dict(),
                "state_dict": {WEIGHTS_PREFIX + name: value
                               for name, value in model.state_dict().items()}},
               run_dir / "checkpoints" / "last.ckpt")
    return run_dir


