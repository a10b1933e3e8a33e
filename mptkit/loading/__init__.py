"""Reading a model from wherever a user points: the one loader of inference, eval, export and serve.

A path is one of
- an HF-format directory: an mptkit export, `save_pretrained` output, or a hub download
  (mosaicml/mpt-7b*) with `model.safetensors`, sharded safetensors (`*.index.json`) or `.bin` files;
- a training checkpoint of `mptkit train` (a `step_*` DCP directory), or the directory holding
  them (its newest complete one is read);
- a Composer / llm-foundry checkpoint file (`*.pt`, read by `loading.composer`).

It becomes a model in eval mode, its tokenizer, and a `ModelSource` saying what was read. One dtype
vocabulary (`DTYPES`, with the short names training configs use) and one tokenizer rule serve every
caller. The training area writes checkpoints; the read side of their format lives here so that
nothing that only reads a model depends on the trainer.
"""

from __future__ import annotations

import contextlib
import json
import re
import struct
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# ---- dtypes -------------------------------------------------------------------------------------

# Names a user may give, long and short (training configs say fp32/bf16), and "auto".
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def cpu_supports_bf16() -> bool:
    """bf16 matmuls pay off on CPUs with native bf16 (AVX512-BF16 or AMX); elsewhere they are emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """A dtype name -> torch dtype. `auto`: bf16 on CUDA with bf16 (else fp16) and on CPUs with
    native bf16, fp32 elsewhere."""
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_supports_bf16() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {', '.join(('auto', *DTYPES))}")
    return DTYPES[name]


# ---- what a path holds --------------------------------------------------------------------------

_STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINING_MODEL_CONFIG = "model_config.json"  # written beside each training checkpoint
TRAINING_RUN_CONFIG = "run_config.yaml"
CHECKPOINTS_DIR = "checkpoints"  # a run's checkpoint.dir by default: {output_dir}/checkpoints
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A model path that cannot be read; the message names the file and what is wrong."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def is_checkpoint(path: Path) -> bool:
    """A complete DCP checkpoint: DCP writes `.metadata` last, after every rank's data."""
    return (Path(path) / ".metadata").is_file()


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete `step_*` checkpoints in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in directory.iterdir()
        if (match := _STEP_DIR.match(path.name)) and is_checkpoint(path)
    ]
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory: Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a directory of them (its newest)."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    newest = latest_checkpoint(path)
    if newest is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint (no .metadata) nor a directory holding step_* checkpoints")
    return newest


@dataclass(frozen=True)
class ModelSource:
    """What a model path turned out to be."""

    path: Path  # the directory the weights are read from (the newest step_* for a run directory), or the Composer file
    format: str  # "hf", "training-checkpoint" or "composer"

    @property
    def step(self) -> int | None:
        """The optimizer steps that made these weights, where the checkpoint records them."""
        if self.format == "composer":
            return self.composer().step
        match = _STEP_DIR.match(self.path.name)
        return int(match.group(1)) if self.format == "training-checkpoint" and match else None

    @property
    def name(self) -> str:
        """A name for the model: the run's (a Composer checkpoint's run name; for a training
        checkpoint its run directory's, output_dir/checkpoints/step_*), else the directory's."""
        if self.format == "composer":
            return self.composer().run_name or self.path.stem
        if self.format == "training-checkpoint":
            holder = self.path.parent
            return holder.parent.name if holder.name == CHECKPOINTS_DIR else holder.name
        return self.path.name

    def composer(self):
        """The parts of a Composer checkpoint (`loading.composer.ComposerCheckpoint`)."""
        from .composer import read_composer_checkpoint

        return read_composer_checkpoint(self.path)


def find_source(path: str | Path) -> ModelSource:
    """Classify a model path; a path that is neither kind fails saying what was expected."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model directory")
    if path.is_file():
        return ModelSource(path, "composer")
    if is_checkpoint(path) or latest_checkpoint(path) is not None:
        return ModelSource(resolve_checkpoint(path), "training-checkpoint")
    if (path / "config.json").is_file():
        return ModelSource(path, "hf")
    raise FileNotFoundError(
        f"{path}: expected an HF-format model directory (config.json + weights) or a training checkpoint "
        "(a step_* directory with .metadata, or a directory holding them), or a Composer checkpoint file"
    )


def read_config_fields(source: ModelSource) -> dict:
    """The model's config fields as stored (config.json, a training checkpoint's model_config.json, or
    the llm-foundry config inside a Composer checkpoint)."""
    if source.format == "composer":
        return dict(source.composer().config_fields)
    name = TRAINING_MODEL_CONFIG if source.format == "training-checkpoint" else "config.json"
    file = source.path / name
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing; a training checkpoint keeps its model config there") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None


# ---- weights files --------------------------------------------------------------------------------


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
def _naming_bad_weights(files: list[Path]):
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


# ---- training checkpoints ------------------------------------------------------------------------


@contextlib.contextmanager
def single_process_quietly():
    """DCP warns on every single-process save/load, which is intended use here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def load_dcp_model_weights(model: nn.Module, path: Path) -> None:
    """Only the model weights of a training checkpoint, into `model` (which may be FSDP-sharded).

    Without a process group this reads every shard into one process, whatever world size wrote it.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model)}
    with single_process_quietly(), _naming_bad_weights([Path(path) / ".metadata"]):
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    set_model_state_dict(model, state["model"])


def read_run_config(checkpoint: Path) -> dict:
    """The run config saved beside a training checkpoint, as plain YAML ({} when it is missing or
    unreadable): what readers of a checkpoint show of its run, never how a model is built."""
    import yaml

    file = Path(checkpoint) / TRAINING_RUN_CONFIG
    try:
        config = yaml.safe_load(file.read_text()) if file.is_file() else {}
    except yaml.YAMLError:
        return {}
    return config if isinstance(config, dict) else {}


def training_run_tokenizer(checkpoint: Path) -> str | None:
    """The tokenizer the run that wrote `checkpoint` used (None: MPT's default)."""
    data = read_run_config(checkpoint).get("data")
    return data.get("tokenizer") if isinstance(data, dict) else None


# ---- the model ------------------------------------------------------------------------------------


def read_model_config(source: ModelSource, max_seq_len: int | None = None):
    """The MPTConfig of an MPT source, with the context raised to `max_seq_len` where positions allow
    it (ALiBi, RoPE); a learned position table cannot grow, so asking beyond it fails."""
    from mptkit.model import MPTConfig

    config = MPTConfig.from_dict(read_config_fields(source))
    if max_seq_len is not None and max_seq_len > config.max_seq_len:
        if config.uses_learned_positions:
            raise ValueError(
                f"max_seq_len={max_seq_len}: this model has learned position embeddings for "
                f"{config.max_seq_len} positions and cannot extrapolate (ALiBi models can)"
            )
        config.max_seq_len = max_seq_len
    return config


def _dtype_argument() -> str:
    import transformers

    # transformers 5 calls the argument `dtype`, older versions `torch_dtype`
    return "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def load_hf_mpt(source: ModelSource, config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The weights of an HF-format MPT directory in a model built from `config` (the stored one, or
    one with overrides such as a fine-tuning run's dropout)."""
    from mptkit.model import MPTForCausalLM

    files = check_weight_files(source.path)
    with _naming_bad_weights(files):
        return MPTForCausalLM.from_pretrained(str(source.path), config=config, **{_dtype_argument(): dtype})


def load_weights(source: ModelSource, config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A model built from `config` (the source's own, or one with overrides such as a fine-tuning
    run's dropout) holding the weights of the MPT model at `source`, any format."""
    from mptkit.model import MPTForCausalLM

    if source.format == "hf":
        return load_hf_mpt(source, config, dtype)
    if source.format == "composer":
        from .composer import load_composer_weights

        with torch.device("meta"):  # built in `dtype`: the weights are copied in one by one, converted
            model = MPTForCausalLM(config).to(dtype)
        model.to_empty(device="cpu")
        load_composer_weights(model, source.composer())
        return model
    with torch.device("meta"):
        model = MPTForCausalLM(config)
    model.to_empty(device="cpu")
    load_dcp_model_weights(model, source.path)
    return model.to(dtype)


def source_identity(source: ModelSource, config_fields: dict):
    """The `BaseIdentity` of a model source (what a LoRA adapter records about its base), from its
    stored config fields (`read_config_fields`, which the caller has read already)."""
    from mptkit.adapters import base_identity

    if source.format == "hf":
        files = [*weight_files(source.path), *sorted(source.path.glob("*.index.json"))]
    elif source.format == "composer":
        files = [source.path]
    else:
        files = [source.path / ".metadata", *sorted(source.path.glob("*.distcp"))]
    return base_identity(source.path, config_fields, files)


def _read(source: ModelSource, dtype: torch.dtype, max_seq_len: int | None) -> nn.Module:
    if source.format == "hf" and read_config_fields(source).get("model_type") != "mpt":
        # another architecture (eval compares against them): transformers' own classes, local files only
        from transformers import AutoModelForCausalLM

        files = check_weight_files(source.path)
        with _naming_bad_weights(files):
            return AutoModelForCausalLM.from_pretrained(str(source.path), local_files_only=True,
                                                        **{_dtype_argument(): dtype})
    return load_weights(source, read_model_config(source, max_seq_len), dtype)


def _with_adapter(base: ModelSource, adapter: Path, dtype: torch.dtype, max_seq_len: int | None) -> nn.Module:
    """`base` with a PEFT adapter merged in fp32 (then cast): refused when the adapter records
    another base than this one."""
    from mptkit.adapters import load_adapter, read_base_identity

    trained_on = read_base_identity(adapter)
    if (trained_on is not None and trained_on.path is not None
            and trained_on.sha256 != source_identity(base, read_config_fields(base)).sha256):
        raise CheckpointError(f"{adapter}: this adapter was trained on the base {trained_on.short()}, not on "
                              f"{base.path} (its config or weights differ); load it on that base")
    return load_adapter(_read(base, torch.float32, max_seq_len), adapter).to(dtype)


def _lora_run_base(source: ModelSource) -> ModelSource | None:
    """The base of a LoRA run's checkpoint (it holds adapter weights only), None for other sources."""
    from mptkit.adapters import read_base_identity

    trained_on = read_base_identity(source.path) if source.format == "training-checkpoint" else None
    if trained_on is None:
        return None
    if trained_on.path is None:
        raise CheckpointError(f"{source.path}: a LoRA run's checkpoint whose base was a preset's fresh "
                              "initialisation, which no file holds; LoRA-tune a saved model (model.init_from)")
    try:
        return find_source(trained_on.path)
    except FileNotFoundError:
        raise CheckpointError(f"{source.path}: a LoRA run's checkpoint (adapter weights only); its base "
                              f"{trained_on.path} is gone") from None


def load_model(path: str | Path, *, dtype: str = "float32", device: str = "cpu", max_seq_len: int | None = None,
               adapter: str | Path | None = None) -> tuple[nn.Module, ModelSource]:
    """The model at `path` in eval mode on `device` in `dtype` (a `DTYPES` name or "auto"), and what
    was read. `max_seq_len` raises the context window (ALiBi extrapolation, the StoryWriter recipe).
    `adapter`: a PEFT LoRA adapter directory merged into the weights. A LoRA run's checkpoint is read
    as its base (recorded in the checkpoint) with the checkpoint's adapter."""
    from mptkit.adapters import CHECKPOINT_ADAPTER_DIR, check_adapter_dir

    source = find_source(path)
    torch_dtype = resolve_dtype(dtype, device)
    if (base := _lora_run_base(source)) is not None:
        if adapter is not None:
            raise ValueError(f"{source.path} is a LoRA run's checkpoint and carries its own adapter; "
                             "give its base as the model to apply another adapter")
        model = _with_adapter(base, source.path / CHECKPOINT_ADAPTER_DIR, torch_dtype, max_seq_len)
    elif adapter is not None:
        model = _with_adapter(source, check_adapter_dir(adapter), torch_dtype, max_seq_len)
    else:
        model = _read(source, torch_dtype, max_seq_len)
    return model.to(torch.device(device)).eval(), source


# ---- the tokenizer --------------------------------------------------------------------------------


def tokenizer_location(source: ModelSource, override: str | None = None) -> str | None:
    """Where the tokenizer comes from, one rule for every caller: `override` if given, else the files
    saved beside the weights (or inside a Composer checkpoint: `load_tokenizer_for` writes them out),
    else (training checkpoints) the run's data.tokenizer, else None: the bundled GPT-NeoX-20B
    tokenizer of MPT."""
    if override is not None:
        return override
    if (source.path / "tokenizer.json").is_file():
        return str(source.path)
    if source.format == "training-checkpoint":
        return training_run_tokenizer(source.path)
    return None


def load_tokenizer_for(source: ModelSource, override: str | None = None):
    from mptkit.data.tokenizer import load_tokenizer

    saved = source.composer().tokenizer_files if override is None and source.format == "composer" else {}
    if saved:
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
         max_seq_len: int | None = None, adapter: str | Path | None = None) -> LoadedModel:
    """Model (eval mode) and tokenizer of `path`; see `load_model` and `tokenizer_location`."""
    from mptkit.data.tokenizer import check_vocab_fits

    model, source = load_model(path, dtype=dtype, device=device, max_seq_len=max_seq_len, adapter=adapter)
    loaded = LoadedModel(model=model, tokenizer=load_tokenizer_for(source, tokenizer), source=source)
    try:
        check_vocab_fits(loaded.tokenizer, model.config.vocab_size)
    except ValueError as exc:  # the ids a text actually uses may still fit; say it before an IndexError does
        warnings.warn(f"{source.path}: {exc}", stacklevel=2)
    return loaded
