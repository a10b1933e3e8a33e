"""What a model location turned out to be: one class per kind, behind one small interface.

Every kind answers the same questions: its config fields as stored, its weights in a model built
from a config, its tokenizer, its identity (what an adapter or a run records to find it again) and
the training step that made it. Callers never ask which kind they hold; a new kind is a new class
here (the hub's is `hub.HubRepo`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .checkpoints import (
    CHECKPOINTS_DIR,
    TRAINING_MODEL_CONFIG,
    CheckpointError,
    checkpoint_step,
    is_checkpoint,
    latest_checkpoint,
    load_dcp_model_weights,
    resolve_checkpoint,
    training_run_tokenizer,
)
from .weights import load_hf_weights, weight_files

# What `stored_dtype` may report: the dtypes a checkpoint is read in without rounding.
_STORED_DTYPES = ("float32", "bfloat16", "float16")


def _read_json(file: Path, missing: str) -> dict:
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing; {missing}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None


def _empty_model(config, dtype: torch.dtype | None = None) -> nn.Module:
    """An MPT of `config` with uninitialised CPU storage (the weights are read in next)."""
    from mptkit.model import MPTForCausalLM

    with torch.device("meta"):
        model = MPTForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.to_empty(device="cpu")


@dataclass(frozen=True)
class ModelSource:
    """A model to read. `path` is the directory (or file) its weights are read from."""

    path: Path
    description: ClassVar[str] = "a model"

    def config_fields(self) -> dict:
        """The model's config fields as stored."""
        raise NotImplementedError

    def load_weights(self, config, dtype: torch.dtype) -> nn.Module:
        """A model built from `config` (the stored one, or one with overrides) holding these weights."""
        raise NotImplementedError

    def identity_files(self) -> list[Path]:
        """The files whose contents make these weights (fingerprinted by `identity`)."""
        raise NotImplementedError

    @property
    def reference(self) -> str:
        """How to find this model again (what an adapter or a run records): its path."""
        return str(self.path)

    @property
    def step(self) -> int | None:
        """The optimizer steps that made these weights, where the source records them."""
        return None

    @property
    def name(self) -> str:
        return self.path.name

    def tokenizer_location(self) -> str | None:
        """Where this source's own tokenizer is (None: it has none of its own)."""
        return str(self.path) if (self.path / "tokenizer.json").is_file() else None

    def tokenizer_files(self) -> dict[str, str]:
        """Tokenizer files kept inside the source itself (name -> text), for kinds that are one file."""
        return {}

    def training_record(self):
        """What the source records of its training (`training_record.TrainingRecord`), or None."""
        return None

    def stored_dtype(self) -> str:
        """The dtype the weights are stored in, so that reading them neither copies nor rounds."""
        return "float32"

    def lora_base_identity(self):
        """What a LoRA run's checkpoint (adapter weights only) records of its base; None otherwise."""
        return None

    def lora_base(self) -> ModelSource | None:
        """The base a LoRA run's checkpoint adapts, found again; None for other sources."""
        trained_on = self.lora_base_identity()
        if trained_on is None:
            return None
        if trained_on.path is None:
            raise CheckpointError(f"{self.path}: a LoRA run's checkpoint whose base was a preset's fresh "
                                  "initialisation, which no file holds; LoRA-tune a saved model (model.init_from)")
        try:
            return find_source(trained_on.path)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: a LoRA run's checkpoint (adapter weights only); its base "
                                  f"{trained_on.path} is gone") from None

    def identity(self, config_fields: dict):
        """The `BaseIdentity` of this source (what a LoRA adapter records about its base), from its
        stored config fields (which the caller has read already)."""
        from mptkit.adapters import base_identity

        return base_identity(self.reference, config_fields, self.identity_files())


@dataclass(frozen=True)
class HFDirectory(ModelSource):
    """An HF-format directory: an mptkit export, `save_pretrained` output, or a hub download."""

    description: ClassVar[str] = "an HF-format directory"

    def config_fields(self) -> dict:
        return _read_json(self.path / "config.json", "an HF-format model keeps its config there")

    def load_weights(self, config, dtype: torch.dtype) -> nn.Module:
        return load_hf_weights(self.path, config, dtype)

    def identity_files(self) -> list[Path]:
        return [*weight_files(self.path), *sorted(self.path.glob("*.index.json"))]

    def stored_dtype(self) -> str:
        fields = self.config_fields()
        stored = fields.get("dtype") or fields.get("torch_dtype")
        return stored if stored in _STORED_DTYPES else "float32"


@dataclass(frozen=True)
class TrainingCheckpoint(ModelSource):
    """A `step_*` DCP checkpoint of `mptkit train` (for a run directory, its newest complete one)."""

    description: ClassVar[str] = "a training checkpoint of `mptkit train`"

    def config_fields(self) -> dict:
        return _read_json(self.path / TRAINING_MODEL_CONFIG, "a training checkpoint keeps its model config there")

    def load_weights(self, config, dtype: torch.dtype) -> nn.Module:
        model = _empty_model(config)
        load_dcp_model_weights(model, self.path)
        return model.to(dtype)

    def identity_files(self) -> list[Path]:
        return [self.path / ".metadata", *sorted(self.path.glob("*.distcp"))]

    @property
    def step(self) -> int | None:
        return checkpoint_step(self.path)

    @property
    def name(self) -> str:
        """The run directory's name (output_dir/checkpoints/step_*)."""
        holder = self.path.parent
        return holder.parent.name if holder.name == CHECKPOINTS_DIR else holder.name

    def tokenizer_location(self) -> str | None:
        return super().tokenizer_location() or training_run_tokenizer(self.path)

    def training_record(self):
        from .training_record import read_run_record

        return read_run_record(self)

    def lora_base_identity(self):
        from mptkit.adapters import read_base_identity

        return read_base_identity(self.path)


@dataclass(frozen=True)
class ComposerFile(ModelSource):
    """A Composer / llm-foundry checkpoint file (`ep0-ba2000-rank0.pt`), read by `loading.composer`."""

    description: ClassVar[str] = "a Composer / llm-foundry checkpoint"

    def composer(self):
        from .composer import read_composer_checkpoint

        return read_composer_checkpoint(self.path)

    def config_fields(self) -> dict:
        return dict(self.composer().config_fields)

    def load_weights(self, config, dtype: torch.dtype) -> nn.Module:
        from .composer import load_composer_weights

        model = _empty_model(config, dtype)  # built in `dtype`: the weights are copied in one by one, converted
        load_composer_weights(model, self.composer())
        return model

    def identity_files(self) -> list[Path]:
        return [self.path]

    @property
    def step(self) -> int | None:
        return self.composer().step

    @property
    def name(self) -> str:
        return self.composer().run_name or self.path.stem

    def tokenizer_location(self) -> str | None:
        return None

    def tokenizer_files(self) -> dict[str, str]:
        return dict(self.composer().tokenizer_files)

    def training_record(self):
        from .training_record import TrainingRecord

        checkpoint = self.composer()
        return TrainingRecord(step=checkpoint.step, tokens=checkpoint.tokens, run_name=checkpoint.run_name)


def local_source(path: Path) -> ModelSource:
    """Classify an existing path; one that is no kind fails saying what was expected."""
    if path.is_file():
        return ComposerFile(path)
    if is_checkpoint(path) or latest_checkpoint(path) is not None:
        return TrainingCheckpoint(resolve_checkpoint(path))
    if (path / "config.json").is_file():
        return HFDirectory(path)
    raise FileNotFoundError(
        f"{path}: expected an HF-format model directory (config.json + weights) or a training checkpoint "
        "(a step_* directory with .metadata, or a directory holding them), or a Composer checkpoint file"
    )


def find_source(location: str | Path, revision: str | None = None) -> ModelSource:
    """The one resolution rule of every command: a path that exists is read as it is; otherwise
    `org/name` (or `org/name@revision`) is a hub repository, read from the hub cache or downloaded."""
    path = Path(location).expanduser()
    if path.exists():
        if revision is not None:
            raise ValueError(f"{location}: --revision applies to hub names (org/name), not to a local path")
        return local_source(path)
    from .hub import is_hub_name, resolve_hub_repo

    if is_hub_name(str(location)):
        return resolve_hub_repo(str(location), revision)
    raise FileNotFoundError(f"{location}: no such model directory (nor a hub name: org/name or org/name@revision)")
