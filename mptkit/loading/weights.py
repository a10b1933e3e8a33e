"""Weights files of an HF-format directory: which they are, whether they are whole, and reading them
into an MPT model with errors that name the file."""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import torch
from torch import nn

from .checkpoints import CheckpointError

_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def weight_files(directory: Path) -> list[Path]:
    """The weights files of an HF-format directory, shards listed by their index; missing ones fail."""
    for index_name in _WEIGHT_INDEXES:
        index = directory / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{index}: not a weights index (expected a JSON weight_map: {exc})") from None
            missing = [name for name in names if not (directory / name).is_file()]
            if missing:
                raise CheckpointError(f"{index}: lists {missing[0]}, which is missing from {directory}")
            return [directory / name for name in names]
    files = [directory / name for name in _WEIGHT_FILES if (directory / name).is_file()]
    if not files:
        raise CheckpointError(f"{directory}: no weights (expected {' or '.join(_WEIGHT_FILES)}, or a sharded index)")
    return files[:1]


def check_safetensors(path: Path) -> None:
    """A safetensors file's header is whole and its tensors fit in the file (a truncated download
    fails here with its size, not deep inside a loader)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated or empty ({size} bytes; a safetensors file starts with an 8-byte header size)")
        header_size = struct.unpack("<Q", head)[0]
        if header_size > size - 8:
            raise CheckpointError(f"{path}: truncated or not safetensors (header of {header_size} bytes claimed, "
                                  f"file has {size})")
        try:
            header = json.loads(handle.read(header_size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    needed = 8 + header_size + max(ends, default=0)
    if needed > size:
        raise CheckpointError(f"{path}: truncated: its header describes {needed} bytes, the file has {size} "
                              f"({needed - size} missing); download or export it again")


def check_weight_files(directory: Path) -> list[Path]:
    files = weight_files(directory)
    for file in files:
        if file.suffix == ".safetensors":
            check_safetensors(file)
    return files


@contextlib.contextmanager
def naming_bad_weights(files: list[Path]):
    """Errors of the weight readers (torch.load, safetensors) as one line naming the file(s)."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as exc:  # the readers raise many types; all mean "this file cannot be read"
        if isinstance(exc, (KeyboardInterrupt, MemoryError)):
            raise
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        where = files[0] if len(files) == 1 else f"{files[0].parent} ({len(files)} weight files)"
        raise CheckpointError(f"{where}: cannot be loaded: {type(exc).__name__}: {first_line}") from exc


def dtype_argument() -> str:
    import transformers

    # transformers 5 calls the argument `dtype`, older versions `torch_dtype`
    return "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def load_hf_weights(directory: Path, config, dtype: torch.dtype) -> nn.Module:
    """The weights of an HF-format MPT directory in a model built from `config` (the stored one, or one
    with overrides such as a fine-tuning run's dropout). transformers reads `.bin` shards with
    weights_only, memory-mapped, one file at a time."""
    from mptkit.model import MPTForCausalLM

    files = check_weight_files(directory)
    with naming_bad_weights(files):
        return MPTForCausalLM.from_pretrained(str(directory), config=config, **{dtype_argument(): dtype})
