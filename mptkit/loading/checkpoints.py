"""The read side of `mptkit train`'s checkpoints (DCP `step_*` directories and the files beside them),
so that nothing that only reads a model depends on the trainer."""

from __future__ import annotations

import contextlib
import re
import warnings
from pathlib import Path

from torch import nn

_STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINING_MODEL_CONFIG = "model_config.json"  # written beside each training checkpoint
TRAINING_RUN_CONFIG = "run_config.yaml"
CHECKPOINTS_DIR = "checkpoints"  # a run's checkpoint.dir by default: {output_dir}/checkpoints


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



def checkpoint_step(path: Path) -> int | None:
    match = _STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


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

    from .weights import naming_bad_weights

    state = {"model": get_model_state_dict(model)}
    with single_process_quietly(), naming_bad_weights([Path(path) / ".metadata"]):
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
