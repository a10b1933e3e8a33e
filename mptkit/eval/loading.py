"""Loading what an evaluation needs: a model directory with its tokenizer, and text documents."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def autocast_dtype(name: str) -> torch.dtype | None:
    """`fp32` runs the weights as stored (fp32); `bf16` runs matmuls under bf16 autocast."""
    if name not in DTYPES:
        raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {name!r}")
    return None if name == "fp32" else DTYPES[name]


def load_model(path: str | Path, *, max_seq_len: int | None = None) -> torch.nn.Module:
    """An HF-format causal LM directory in fp32, in eval mode.

    mptkit/MosaicML MPT checkpoints (model_type "mpt") load with mptkit's own classes. For those,
    `max_seq_len` raises the context at load when positions allow it (ALiBi, RoPE: nothing is
    sized by it); a learned position table keeps its trained size and refuses longer inputs.
    Other architectures load through `AutoModelForCausalLM` from local files only.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type == "mpt":
        from mptkit.model import MPTConfig, MPTForCausalLM

        config = MPTConfig.from_pretrained(path)
        overrides = {}
        if max_seq_len and max_seq_len > config.max_seq_len and not config.uses_learned_positions:
            overrides["max_seq_len"] = max_seq_len
        model = MPTForCausalLM.from_pretrained(path, dtype=torch.float32, **overrides)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    return model.eval()


def load_tokenizer_for(model_path: str | Path, tokenizer: str | None = None):
    """The tokenizer saved beside the model, else `tokenizer` (a file, directory, or the bundled
    GPT-NeoX name; None means the bundled one)."""
    from mptkit.data.tokenizer import load_tokenizer

    model_path = Path(model_path)
    if tokenizer is None and (model_path / "tokenizer.json").is_file():
        tokenizer = str(model_path)
    return load_tokenizer(tokenizer)


def read_texts(paths: Sequence[str | Path], text_field: str = "text") -> list[str]:
    """Documents from text files (one document each), JSONL (one per line, `text_field`),
    directories or globs of those. Bad records fail with the file and line."""
    from mptkit.data.errors import ErrorPolicy
    from mptkit.data.sources import iter_segments, resolve_inputs

    sources = resolve_inputs([str(p) for p in paths])
    return [segment.text for segment in iter_segments(sources, text_field, ErrorPolicy("fail"))]
