"""Loading a model and its tokenizer for inference from any place a user may point at.

MODEL is an HF-format directory (an mptkit export, or a hub MPT download such as mosaicml/mpt-7b
with its config.json and weights), or a training checkpoint (a `step_*` DCP directory, or the
directory holding them: its newest is used).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import PreTrainedTokenizerFast

from mptkit.model import MPTForCausalLM

DTYPES = ("auto", "float32", "bfloat16", "float16")


def cpu_supports_bf16() -> bool:
    """bf16 matmuls pay off on CPUs with native bf16 (AVX512-BF16 or AMX); elsewhere they are emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA with bf16 and on CPUs with native bf16, else fp32."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {list(DTYPES)}")
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_supports_bf16() else torch.float32


def is_training_checkpoint(path: Path) -> bool:
    path = Path(path)
    return (path / ".metadata").is_file() or any(
        (child / ".metadata").is_file() for child in path.glob("step_*") if child.is_dir()
    )


@dataclass
class LoadedModel:
    model: MPTForCausalLM
    tokenizer: PreTrainedTokenizerFast
    source: Path  # the directory the weights came from


def load_for_inference(
    path: str | Path,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    tokenizer: str | None = None,
    max_seq_len: int | None = None,
) -> LoadedModel:
    """The model in eval mode on `device` in `dtype`, and its tokenizer.

    `tokenizer` overrides where the tokenizer comes from (default: the model directory, else the
    checkpoint's training config, else the bundled GPT-NeoX-20B one). `max_seq_len` raises the
    context window (ALiBi extrapolation, the StoryWriter recipe).
    """
    path = Path(path).expanduser()
    torch_device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model directory")
    if is_training_checkpoint(path):
        model, source, tokenizer_hint = _load_training_checkpoint(path, torch_dtype)
    elif (path / "config.json").is_file():
        model, source, tokenizer_hint = _load_hf_directory(path, torch_dtype), path, str(path)
    else:
        raise FileNotFoundError(
            f"{path}: expected an HF-format model directory (config.json + weights) or a training "
            "checkpoint (a step_* directory with .metadata, or a directory holding them)"
        )
    if max_seq_len is not None:
        if hasattr(model.transformer, "wpe") and max_seq_len > model.config.max_seq_len:
            raise ValueError(
                f"max_seq_len={max_seq_len}: this model has learned position embeddings for "
                f"{model.config.max_seq_len} positions and cannot extrapolate (ALiBi models can)"
            )
        model.config.max_seq_len = max_seq_len
    model = model.to(torch_device).eval()
    tok = _load_tokenizer(tokenizer or tokenizer_hint)
    return LoadedModel(model=model, tokenizer=tok, source=source)


def _load_hf_directory(path: Path, dtype: torch.dtype) -> MPTForCausalLM:
    # transformers 5 calls the argument `dtype`, older versions `torch_dtype`
    dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return MPTForCausalLM.from_pretrained(str(path), **{dtype_arg: dtype})


def _load_training_checkpoint(path: Path, dtype: torch.dtype):
    # the training area's checkpoint format; imported only for this case
    from mptkit.train.checkpoint import load_checkpoint_model

    model, checkpoint, tokenizer_hint = load_checkpoint_model(path)
    return model.to(dtype), checkpoint, tokenizer_hint


def _load_tokenizer(name_or_path: str | None) -> PreTrainedTokenizerFast:
    from mptkit.data.tokenizer import load_tokenizer

    if name_or_path is not None and Path(name_or_path).is_dir():
        directory = Path(name_or_path)
        if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            name_or_path = None  # a model directory saved without its tokenizer: MPT's default one
    return load_tokenizer(name_or_path)
