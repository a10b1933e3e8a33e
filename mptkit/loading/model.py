"""From a model location to a model in eval mode and its tokenizer: the one loader of inference,
eval, export and serve (and of a training run's `model.init_from`)."""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoints import CheckpointError
from .dtypes import resolve_dtype
from .sources import HFDirectory, ModelSource, find_source
from .weights import check_weight_files, dtype_argument, naming_bad_weights


def read_model_config(source: ModelSource, max_seq_len: int | None = None):
    """The MPTConfig of an MPT source, with the context raised to `max_seq_len` (through the same
    merge and validation as every other field) where positions allow it (ALiBi, RoPE); a learned
    position table cannot grow, so asking beyond it fails."""
    from mptkit.model import MPTConfig
    from mptkit.model.configuration_mpt import merge_config_fields

    fields = source.config_fields()
    config = MPTConfig.from_dict(fields)
    if max_seq_len is None or max_seq_len <= config.max_seq_len:
        return config
    if config.uses_learned_positions:
        raise ValueError(f"max_seq_len={max_seq_len}: this model has learned position embeddings for "
                         f"{config.max_seq_len} positions and cannot extrapolate (ALiBi models can)")
    return MPTConfig.from_dict(merge_config_fields(fields, {"max_seq_len": max_seq_len}))


def _read(source: ModelSource, dtype: torch.dtype, max_seq_len: int | None) -> nn.Module:
    if isinstance(source, HFDirectory) and source.config_fields().get("model_type") != "mpt":
        # another architecture (eval compares against them): transformers' own classes, local files only
        from transformers import AutoModelForCausalLM

        files = check_weight_files(source.path)
        with naming_bad_weights(files):
            return AutoModelForCausalLM.from_pretrained(str(source.path), local_files_only=True,
                                                        **{dtype_argument(): dtype})
    return source.load_weights(read_model_config(source, max_seq_len), dtype)


def _with_adapter(base: ModelSource, adapter: Path, dtype: torch.dtype, max_seq_len: int | None) -> nn.Module:
    """`base` with a PEFT adapter merged in fp32 (then cast): refused when the adapter records
    another base than this one."""
    from mptkit.adapters import load_adapter, read_base_identity

    trained_on = read_base_identity(adapter)
    if (trained_on is not None and trained_on.path is not None
            and trained_on.sha256 != base.identity(base.config_fields()).sha256):
        raise CheckpointError(f"{adapter}: this adapter was trained on the base {trained_on.short()}, not on "
                              f"{base.reference} (its config or weights differ); load it on that base")
    return load_adapter(_read(base, torch.float32, max_seq_len), adapter).to(dtype)


def find_adapter(location: str | Path) -> Path:
    """A PEFT adapter directory, or a hub name of one (fetched into the hub cache)."""
    from mptkit.adapters import check_adapter_dir

    from .hub import fetch_hub_adapter, is_hub_name

    if not Path(location).expanduser().exists() and is_hub_name(str(location)):
        return check_adapter_dir(fetch_hub_adapter(str(location)))
    return check_adapter_dir(location)


def load_model(path: str | Path, *, dtype: str = "float32", device: str = "cpu", max_seq_len: int | None = None,
               adapter: str | Path | None = None, revision: str | None = None) -> tuple[nn.Module, ModelSource]:
    """The model at `path` in eval mode on `device` in `dtype` (a `DTYPES` name or "auto"), and what
    was read. `max_seq_len` raises the context window (ALiBi extrapolation, the StoryWriter recipe).
    `adapter`: a PEFT LoRA adapter directory merged into the weights. A LoRA run's checkpoint is read
    as its base (recorded in the checkpoint) with the checkpoint's adapter. `path` and `adapter` may be
    hub names (org/name[@revision]; `revision` applies to the model)."""
    from mptkit.adapters import CHECKPOINT_ADAPTER_DIR

    source = find_source(path, revision)
    torch_dtype = resolve_dtype(dtype, device)
    if (base := source.lora_base()) is not None:
        if adapter is not None:
            raise ValueError(f"{source.path} is a LoRA run's checkpoint and carries its own adapter; "
                             "give its base as the model to apply another adapter")
        model = _with_adapter(base, source.path / CHECKPOINT_ADAPTER_DIR, torch_dtype, max_seq_len)
    elif adapter is not None:
        model = _with_adapter(source, find_adapter(adapter), torch_dtype, max_seq_len)
    else:
        model = _read(source, torch_dtype, max_seq_len)
    return model.to(torch.device(device)).eval(), source


# ---- the tokenizer --------------------------------------------------------------------------------


def tokenizer_location(source: ModelSource, override: str | None = None) -> str | None:
    """Where the tokenizer comes from, one rule for every caller: `override` if given, else the
    source's own (files beside the weights; a training run's data.tokenizer), else None: the
    bundled GPT-NeoX-20B tokenizer of MPT."""
    return override if override is not None else source.tokenizer_location()


def load_tokenizer_for(source: ModelSource, override: str | None = None):
    from mptkit.data.tokenizer import load_tokenizer

    saved = source.tokenizer_files() if override is None else {}
    if saved:  # kept inside the source (a Composer checkpoint): written out for the tokenizer's reader
        with tempfile.TemporaryDirectory(prefix="mptkit-tokenizer-") as directory:
            for name, text in saved.items():
                (Path(directory) / name).write_text(text)
            return load_tokenizer(directory)
    return load_tokenizer(tokenizer_location(source, override))


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object  # a PreTrainedTokenizerFast with MPT's conventions (mptkit.data.tokenizer)
    source: ModelSource


def load(path: str | Path, *, dtype: str = "auto", device: str = "cpu", tokenizer: str | None = None,
         max_seq_len: int | None = None, adapter: str | Path | None = None, revision: str | None = None) -> LoadedModel:
    """Model (eval mode) and tokenizer of `path`; see `load_model` and `tokenizer_location`."""
    from mptkit.data.tokenizer import check_vocab_fits

    model, source = load_model(path, dtype=dtype, device=device, max_seq_len=max_seq_len, adapter=adapter,
                               revision=revision)
    loaded = LoadedModel(model=model, tokenizer=load_tokenizer_for(source, tokenizer), source=source)
    try:
        check_vocab_fits(loaded.tokenizer, model.config.vocab_size)
    except ValueError as exc:  # the ids a text actually uses may still fit; say it before an IndexError does
        warnings.warn(f"{source.path}: {exc}", stacklevel=2)
    return loaded
