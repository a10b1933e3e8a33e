"""Composer / llm-foundry checkpoints, read without composer or llm-foundry installed.

A Composer trainer writes one `torch.save` file per checkpoint (`ep0-ba2000-rank0.pt`,
`latest-rank0.pt`) holding, for llm-foundry's MPT (`ComposerMPTCausalLM`, whose `.model` is the
MPTForCausalLM):

    {"state": {"model": {"model.transformer.wte.weight": tensor,
                         "model.transformer.blocks.0.norm_1.weight": tensor, ...},
               "optimizers": {...}, "schedulers": [...], "callbacks": {...}, "algorithms": [...],
               "timestamp": {"epoch": int, "batch": int, "sample": int, "token": int, ...,
                             "total_wct": datetime.timedelta, ...},
               "integrations": {"huggingface": {
                   "model": {"config": {"file_extension": ".json", "class": "llmfoundry...MPTConfig",
                                        "content": {the fields of the model's config.json}}},
                   "tokenizer": {"tokenizer": {"file_extension": ".json", "content": {...}},
                                 "tokenizer_config": {...}, "special_tokens_map": {...}}}},
               "run_name": str, ...},
     "rng": [{"python": ..., "numpy": (..., ndarray, ...), "torch": tensor, "cuda": tensor}]}

(Composer's `State.state_dict`, `Timestamp.state_dict` and `HuggingFaceModel.get_metadata`; read
the same way by llm-foundry's scripts/inference/convert_composer_to_hf.py.) Below the `model.`
prefix the weight names are the hub's MPT names, which mptkit's model uses too, and the config is
the hub's config.json, so `MPTConfig` validates it as it does any download.

The pickle is read with `weights_only=True`: it can build tensors, containers, numbers and strings,
plus the plain data Composer stores beside them (timedeltas, numpy arrays of the RNG state), and
runs no code from the file. Tensors are memory-mapped, so the optimizer state next to the weights
is never read and each weight is copied into the model on its own: peak memory stays near one copy
of the weights in the dtype asked for.
"""

from __future__ import annotations

import datetime
import functools
import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoints import CheckpointError

_PREFIX = "model."  # ComposerMPTCausalLM.model


def _plain_data_globals() -> list:
    """What Composer pickles beside tensors that is data, not code: weights_only=True refuses it
    unless named. numpy 1 and 2 spell the array constructor's module differently."""
    reconstruct = np.ndarray.__reduce__(np.zeros(0))[0]
    return [
        datetime.timedelta,
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),  # numpy >= 1.25 pickles a dtype through its class
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        (reconstruct, "numpy._core.multiarray._reconstruct"),
    ]


@dataclass(frozen=True)
class ComposerCheckpoint:
    path: Path
    config_fields: dict  # llm-foundry's config.json content
    weights: dict[str, torch.Tensor]  # hub names (prefix stripped), memory-mapped from the file
    tokenizer_files: dict[str, str]  # file name -> text, the JSON/text files of the HF tokenizer
    step: int | None  # Composer's batch count: optimizer steps
    tokens: int | None  # tokens trained on
    run_name: str | None


def _unpickle(path: Path) -> object:
    try:
        with torch.serialization.safe_globals(_plain_data_globals()):
            try:
                return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                # the legacy (pre-zip) format cannot be mapped: read whole
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        allowed = {f"{item.__module__}.{item.__qualname__}" if not isinstance(item, tuple) else item[1]
                   for item in _plain_data_globals()}
        needed = [name for name in torch.serialization.get_unsafe_globals_in_checkpoint(path) if name not in allowed]
        raise CheckpointError(
            f"{path}: unpickling it needs {', '.join(needed) or 'code'}, and mptkit reads checkpoints with "
            "torch.load(weights_only=True), which runs no code from the file (it builds tensors, containers, "
            "numbers, strings, timedeltas and numpy arrays). If you trust the file, keep what mptkit reads: "
            "s = torch.load(F, weights_only=False); torch.save({'state': {k: s['state'][k] for k in "
            "('model', 'integrations', 'timestamp')}}, G)"
        ) from None


def _section(mapping: object, keys: tuple[str, ...], path: Path, expected: str) -> object:
    """mapping[keys[0]][keys[1]]...; a missing level fails naming the dotted path."""
    value = mapping
    for depth, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            where = ".".join(keys[: depth + 1])
            raise CheckpointError(f"{path}: not a Composer/llm-foundry checkpoint: no {where} ({expected})")
        value = value[key]
    return value


def _portable_attention(config: dict) -> dict:
    """The config with the training machine's attention kernel (flash, triton) replaced by `torch`,
    as llm-foundry's own converter does: the kernel is not a property of the weights, and a GPU-only
    one would stop the model from loading anywhere else."""
    attn = config.get("attn_config")
    if isinstance(attn, dict) and attn.get("attn_impl") in ("flash", "triton"):
        return {**config, "attn_config": {**attn, "attn_impl": "torch"}}
    return config


def _tokenizer_files(saved: object) -> dict[str, str]:
    """The tokenizer's files as Composer stored them ({name: {file_extension, content}}). A `.py`
    file (a tokenizer's own code) is not written; `.model` (SentencePiece) is not MPT's tokenizer."""
    files = {}
    for name, entry in (saved or {}).items():
        extension = entry.get("file_extension") if isinstance(entry, dict) else None
        if extension == ".json":
            content = entry["content"]
            files[f"{name}.json"] = content if isinstance(content, str) else json.dumps(content)
        elif extension == ".txt":
            files[f"{name}.txt"] = "".join(f"{line}\n" for line in entry["content"])
    return files


def _counter(timestamp: object, name: str) -> int | None:
    value = timestamp.get(name) if isinstance(timestamp, dict) else None
    return int(value) if isinstance(value, (int, np.integer)) else None


@functools.lru_cache(maxsize=2)
def _read_cached(path: Path, mtime_ns: int, size: int) -> ComposerCheckpoint:
    if path.suffix in (".safetensors", ".bin") and (path.parent / "config.json").is_file():
        raise CheckpointError(f"{path}: a weights file of an HF-format model; give its directory, {path.parent}")
    if not zipfile.is_zipfile(path) and path.suffix not in (".pt", ".pth", ".ckpt"):
        raise CheckpointError(f"{path}: not a model directory or a Composer checkpoint (a torch.save file)")
    try:
        top = _unpickle(path)
    except CheckpointError:
        raise
    except Exception as exc:  # torch.load's many failure types all mean "this file cannot be read"
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: cannot be read as a torch.save file ({type(exc).__name__}: {first_line}); "
                              "truncated or not a checkpoint?") from None
    state = _section(top, ("state",), path, "Composer's trainer state")
    model_state = _section(top, ("state", "model"), path, "the model's weights")
    config = _section(top, ("state", "integrations", "huggingface", "model", "config", "content"), path,
                      "the llm-foundry model config that Composer's HuggingFaceModel saves")
    if isinstance(config, str):
        config = json.loads(config)
    if not isinstance(config, dict) or config.get("model_type") != "mpt":
        found = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{path}: its model config has model_type {found!r}; mptkit reads llm-foundry's MPT "
                              "(model_type 'mpt'; the older 'mosaic_gpt' names its fields differently)")
    config = _portable_attention(config)
    not_weights = [key for key, value in model_state.items() if not isinstance(value, torch.Tensor)]
    unprefixed = [key for key in model_state if not key.startswith(_PREFIX)]
    if not_weights or unprefixed:
        raise CheckpointError(f"{path}: state.model key {(not_weights or unprefixed)[0]!r} is not an llm-foundry "
                              f"weight (expected tensors named {_PREFIX}transformer.*)")
    timestamp = state.get("timestamp")
    tokenizer = state["integrations"]["huggingface"].get("tokenizer")
    return ComposerCheckpoint(
        path=path,
        config_fields=config,
        weights={key[len(_PREFIX):]: value for key, value in model_state.items()},
        tokenizer_files=_tokenizer_files(tokenizer if isinstance(tokenizer, dict) else {}),
        step=_counter(timestamp, "batch"),
        tokens=_counter(timestamp, "token"),
        run_name=state.get("run_name") if isinstance(state.get("run_name"), str) else None,
    )


def read_composer_checkpoint(path: str | Path) -> ComposerCheckpoint:
    """The parts of a Composer checkpoint file that make a model (cached: several readers ask)."""
    path = Path(path).resolve()
    stat = path.stat()
    return _read_cached(path, stat.st_mtime_ns, stat.st_size)


def load_composer_weights(model: nn.Module, checkpoint: ComposerCheckpoint) -> None:
    """Copy the checkpoint's weights into `model` one tensor at a time (converted to its dtype)."""
    targets = model.state_dict()
    missing = [name for name in targets if name not in checkpoint.weights]
    unexpected = [name for name in checkpoint.weights if name not in targets]
    if missing or unexpected:
        problem = (f"lacks {missing[0]!r}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}" if missing
                   else f"has {_PREFIX}{unexpected[0]!r}, which its config's model has not")
        raise CheckpointError(f"{checkpoint.path}: the weights do not match the config saved with them: state.model "
                              f"{problem}")
    with torch.no_grad():
        for name, target in targets.items():
            source = checkpoint.weights[name]
            if source.shape != target.shape:
                raise CheckpointError(f"{checkpoint.path}: state.model {_PREFIX}{name} has shape {tuple(source.shape)}, "
                                      f"its config's model expects {tuple(target.shape)}")
            target.copy_(source)
