"""Any model mptkit reads, as an HF-format directory (`mptkit export`)."""

from __future__ import annotations

from pathlib import Path

from mptkit.files import staged
from mptkit.loading import ModelSource, load

from .defaults import EXPORT_DTYPES
from .model_card import CARD_FILE, Export, model_card


def export_hf(source: str | Path, out_dir: str | Path, dtype: str = "float32",
              with_tokenizer: bool = True, adapter: str | Path | None = None,
              revision: str | None = None) -> ModelSource:
    """Read `source` (a training checkpoint, possibly sharded, or an HF-format directory) in this one
    process and save it with save_pretrained; returns what was read (for a directory of
    checkpoints, its newest). `adapter`: a PEFT LoRA adapter merged in (in fp32, then cast to
    `dtype`): a plain checkpoint, no peft needed to read it. A LoRA run's checkpoint is exported as
    its base with its adapter merged. A model card (README.md) is written beside the weights."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(EXPORT_DTYPES)}")
    loaded = load(source, dtype=dtype, adapter=adapter, revision=revision)
    tokenizer = loaded.tokenizer if with_tokenizer else None
    export = Export("hf", str(out_dir).rstrip("/"), f"{dtype} safetensors",
                    adapter=Path(adapter) if adapter is not None else None)
    needed = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    with staged(Path(out_dir), needed) as temp:
        loaded.model.save_pretrained(temp, tokenizer=tokenizer)
        (temp / CARD_FILE).write_text(model_card(loaded.model, tokenizer, loaded.source, export))
    return loaded.source
