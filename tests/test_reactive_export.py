"""`python -m moa.export ... part=encoder`: an RxT run's encoder and MLM head as a
transformers masked LM; `pipeline("fill-mask")` ranks what our MLM head ranks."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from moa.errors import ConfigError  # noqa: E402
from moa.hf.export import export  # noqa: E402
from moa.models.language_model import build_model  # noqa: E402
from moa.training.checkpoint import load_checkpoint  # noqa: E402


def our_encoder(rxt_run):
    checkpoint = load_checkpoint(rxt_run / "checkpoints" / "last.ckpt")
    model = build_model(checkpoint["model_config"])
    model.load_state_dict({name.removeprefix("model."): value
                           for name, value in checkpoint["state_dict"].items()})
    return model.eval()


def test_fill_mask_pipeline_ranks_as_our_mlm_head(rxt_run, tmp_path, compose_config):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    import moa  # noqa: F401  (registers model_type moa_rxt_encoder)

    out = export(compose_config(f"run_dir={rxt_run}", f"out={tmp_path / 'encoder'}",
                                "part=encoder", config_name="export"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "the cat sat on a [MASK]"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    position = int((ids[0] == tokenizer.mask_token_id).nonzero()[0])
    model = our_encoder(rxt_run)
    with torch.no_grad():
        logits = model.mlm_logits(model.encode(ids).hidden)[0, position]
    exported = AutoModelForMaskedLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits[0, position], logits)
    predictions = pipeline("fill-mask", model=str(out), top_k=5)(text)
    assert [p["token"] for p in predictions] == logits.topk(5).indices.tolist()
    assert "pipeline_tag: fill-mask" in (out / "README.md").read_text()


def test_parts_must_fit_the_runs_architecture(rxt_run, tmp_path, compose_config):
    with pytest.raises(ConfigError) as error:
        export(compose_config(f"run_dir={rxt_run}", f"out={tmp_path / 'lm'}", "part=model",
                              config_name="export"))
    assert error.value.key == "part" and "encoder" in error.value.allowed
    with pytest.raises(ConfigError) as error:
        export(compose_config(f"run_dir={rxt_run}", f"out={tmp_path / 'x'}", "part=decoder",
                              config_name="export"))
    assert error.value.key == "part"
