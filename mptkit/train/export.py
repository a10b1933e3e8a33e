"""A training checkpoint as an HF-format model directory (`mptkit export`)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from mptkit.model import MPTConfig, MPTForCausalLM

from .checkpoint import load_model_weights, model_config_dict, resolve_checkpoint


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, dtype: str = "float32",
                      with_tokenizer: bool = True) -> Path:
    """Read a (possibly sharded) checkpoint in this one process and save it with save_pretrained.

    Returns the checkpoint directory that was read (the newest one when given their parent).
    """
    path = resolve_checkpoint(checkpoint)
    config = MPTConfig(**model_config_dict(path))
    with torch.device("meta"):
        model = MPTForCausalLM(config)
    model.to_empty(device="cpu")
    load_model_weights(model, path)
    model.to(getattr(torch, dtype))
    tokenizer = None
    if with_tokenizer:
        from mptkit.data.tokenizer import load_tokenizer

        run_config = yaml.safe_load((path / "run_config.yaml").read_text())
        tokenizer = load_tokenizer(run_config.get("data", {}).get("tokenizer"))
    model.save_pretrained(out_dir, tokenizer=tokenizer)
    return path
