"""`evaluate(cfg)`: what eval.py runs, callable from tests; and `run_evaluation`, the
val/test metrics and samples that training ends with too.

With `attention_override=NAME` it evaluates a retrofit: the trained model, then the same
model with another attention swapped in (moa/models/retrofit.py), every trained weight
that fits loaded; a swap that leaves weights untrained is refused unless
`allow_untrained=true`, and metrics_<name>.json names the weights carried and not.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from moa.attention import ATTENTION
from moa.config import ModelConfig
from moa.data import CORPORA, TOKENIZERS, LMDataModule
from moa.errors import ConfigError
from moa.models.generation import SamplingConfig
from moa.models.retrofit import swap_attention, transfer_weights
from moa.schema import check_choice, parse
from moa.training.console import quiet_console
from moa.training.job_log import log_lightning_to_the_job_file
from moa.training.lit import LanguageModelModule
from moa.training.run_config import check_trainer, resolved
from moa.training.run_files import load_run
from moa.training.samples import print_samples
from moa.training.values import check_targets, check_top_level

log = logging.getLogger(__name__)
METRIC_KEYS = [f"{split}_{name}" for split in ("val", "test") for name in ("loss", "ppl", "acc")]


def run_evaluation(module: LanguageModelModule, datamodule: LMDataModule,
                   trainer_config: dict[str, Any], sampling: SamplingConfig,
                   metrics_path: Path | None) -> dict[str, float]:
    """Val and test metrics over the whole splits (or limit_test_batches), written to
    `metrics_path` (unless None), then samples. On conversations (data=dialogue_recall)
    metrics.json also holds the test split's `recall_by_distance` {d: accuracy},
    `answers_by_distance`, `loss_by_turn`, `acc_by_turn` and `answer_acc_by_turn`.
    On one device: a distributed sampler would pad the splits with repeated blocks (after
    DDP training, rank 0 evaluates alone)."""
    check_trainer(trainer_config)
    limit = trainer_config.get("limit_test_batches")
    evaluator = instantiate(
        {k: v for k, v in trainer_config.items() if k not in ("fast_dev_run", "overfit_batches")},
        limit_val_batches=limit, limit_test_batches=limit, logger=False,
        enable_checkpointing=False, callbacks=[], devices=1, num_nodes=1, strategy="auto",
    )
    results = evaluator.validate(module, datamodule=datamodule, verbose=False)[0]
    results |= evaluator.test(module, datamodule=datamodule, verbose=False)[0]
    metrics: dict[str, Any] = {key: float(results[key.replace("_", "/", 1)])
                               for key in metric_keys(module)}
    for key, value in results.items():  # test/<table>/<key>: the conversation scores
        stage, *table = key.split("/")
        if stage == "test" and len(table) == 2:
            metrics.setdefault(table[0], {})[table[1]] = float(value)
    if metrics_path is not None:
        metrics_path.write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))
    if datamodule.tokenizer is not None and sampling.prompts and module.objective.prints_samples:
        print_samples(module, datamodule, sampling)
    return metrics


def metric_keys(module: LanguageModelModule) -> list[str]:
    """`{val,test}_{name}` of the module's objective: loss, ppl (of a cross-entropy), acc and
    the objective's own."""
    objective = module.objective
    names = ["loss", *(["ppl"] if objective.perplexity else []),
             *(name for name in objective.metric_names if name != "loss")]
    return [f"{split}_{name}" for split in ("val", "test") for name in names]


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Load a run's checkpoint (or a `moa.export` directory's weights) with its saved
    config; write DIR/metrics.json."""
    log_lightning_to_the_job_file()
    quiet_console()
    sampling = check_eval_config(cfg)
    run_dir, run_cfg, checkpoint = load_run(cfg)
    # evaluation and sampling run eagerly: compiling would cost more than it saves
    model_config = ModelConfig.from_dict({**checkpoint["model_config"], "compile": False})
    module = LanguageModelModule(model=model_config.to_dict(),
                                 optim=OmegaConf.to_container(run_cfg.optim),
                                 objective=checkpoint.get("hyper_parameters", {}).get("objective"))
    module.load_state_dict(checkpoint["state_dict"])
    pl.seed_everything(cfg.seed, workers=True)

    data = CORPORA.parse(run_cfg.data, "data")
    tokenizer = None
    if data.uses_tokenizer:
        tokenizer = TOKENIZERS.parse(
            {"name": "pretrained", "path": str(run_dir / "tokenizer.json")}, "tokenizer")
    datamodule = LMDataModule(data, tokenizer, seed=int(run_cfg.seed),
                              cache_dir=run_cfg.paths.cache_dir)
    datamodule.prepare_data()
    datamodule.setup("test")
    trainer_config = resolved(cfg, "trainer")
    override = cfg.get("attention_override")
    if not override:
        metrics = run_evaluation(module, datamodule, trainer_config, sampling,
                                 run_dir / "metrics.json")
        return metrics, {"module": module, "datamodule": datamodule}
    # Retrofit: evaluate the trained model, then with the other attention swapped in; the
    # run's own metrics.json is left as it is.
    retrofitted, weights = _retrofit(cfg, module, checkpoint["state_dict"], run_cfg)
    baseline = run_evaluation(module, datamodule, trainer_config, SamplingConfig(), None)
    metrics = run_evaluation(retrofitted, datamodule, trainer_config, sampling, None)
    metrics |= {f"baseline_{key}": baseline[key] for key in METRIC_KEYS}
    metrics |= {f"delta_{key}": metrics[key] - baseline[key] for key in METRIC_KEYS}
    (run_dir / f"metrics_{override}.json").write_text(
        json.dumps({**metrics, "weights": weights}, indent=2))
    return metrics, {"module": retrofitted, "datamodule": datamodule, "weights": weights}


def check_eval_config(cfg: DictConfig) -> SamplingConfig:
    """eval.yaml's values, before any file is read: its top-level keys, the trainer and
    sampling sections, and the retrofit's section (`alcca.k=...`) where one is asked for."""
    check_top_level(cfg)
    check_targets(cfg, sections=())  # a trainer preset's callbacks are training's only
    name = cfg.get("attention_override")
    if name:
        check_choice("attention_override", name, ATTENTION.names())
        ATTENTION.parse({"name": name, **(resolved(cfg, name) if cfg.get(name) else {})}, name)
    return parse(SamplingConfig, resolved(cfg, "sampling"), "sampling")


def _retrofit(cfg: DictConfig, module: LanguageModelModule, state_dict: dict[str, Any],
              run_cfg: DictConfig) -> tuple[LanguageModelModule, dict[str, list[str]]]:
    """A module with `cfg.attention_override` (its settings from the `cfg.<name>` section)
    in place of the trained attention, loaded with every trained weight that fits, and
    the record of its weights (`weights` in metrics_<name>.json): carried (trained, loaded),
    derived (set from the trained config), initialised (random: nothing trained fits) and
    unused (trained, no place in the new model). Refused where any weight is initialised
    or unused, unless `allow_untrained=true`: its loss change would not be a retrofit's."""
    name = cfg.attention_override
    override = {"name": name, **(resolved(cfg, name) if cfg.get(name) else {})}
    config = swap_attention(module.model_config, override)
    retrofitted = LanguageModelModule(model=config.to_dict(),
                                      optim=OmegaConf.to_container(run_cfg.optim))
    report = transfer_weights(retrofitted, state_dict)
    weights = {"carried": report.carried, "derived": report.derived(module.model_config),
               "initialised": report.untrained(module.model_config),
               "unused": report.unexpected}
    log.info("attention_override=%s: %s", name,
             "; ".join(f"{kind} {len(keys)}" for kind, keys in weights.items()))
    lost = weights["initialised"] + weights["unused"]
    if lost and not cfg.get("allow_untrained", False):
        raise ConfigError("attention_override", name,
                          "an attention the trained weights carry into, or allow_untrained=true",
                          f"{len(weights['initialised'])} weights would stay at their random "
                          f"init (first: {weights['initialised'][:2]}) and "
                          f"{len(weights['unused'])} trained weights go unused (first: "
                          f"{weights['unused'][:2]})")
    return retrofitted, weights
