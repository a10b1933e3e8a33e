"""A training checkpoint as an HF-format model directory (`mptkit export`)."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import load_checkpoint_model


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, dtype: str = "float32",
                      with_tokenizer: bool = True) -> Path:
    """Read a (possibly sharded) checkpoint in this one process and save it with save_pretrained.

    Returns the checkpoint directory that was read (the newest one when given their parent).
    """
    model, path, tokenizer_name = load_checkpoint_model(checkpoint)
    model.to(getattr(torch, dtype))
    tokenizer = None
    if with_tokenizer:
        from mptkit.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_name)
    model.save_pretrained(out_dir, tokenizer=tokenizer)
    return path
