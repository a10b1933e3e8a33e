"""Sharded, atomic training checkpoints with torch.distributed.checkpoint (DCP).

Layout of a checkpoint directory `step_00000100/`:
    .metadata, __{rank}_0.distcp   DCP: model and optimizer (sharded as trained, reshardable on
                                   load), scheduler, trainer counters, data-loader position, and
                                   each rank's RNG states
    model_config.json              the MPTConfig, so `mptkit export` can rebuild the model
    run_config.yaml                the training config that wrote it
A LoRA run's DCP holds only the trainable parameters (the adapters) and their optimizer state;
beside it the run writes its extra files: the base's identity and the PEFT adapter (train/lora.py).

Atomicity: every rank writes into `.tmp-step_00000100/`; once DCP has written its `.metadata`
(after all ranks finished), rank 0 fsyncs and renames the directory to its final name. A crash at
any point before the rename leaves only a temp directory, which is ignored and later removed, so the
newest `step_*` directory is always complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from mptkit.files import full_disk_reported
from mptkit.loading import (
    TRAINING_MODEL_CONFIG,
    TRAINING_RUN_CONFIG,
    checkpoint_name,
    list_checkpoints,
    single_process_quietly,
)

from .parallel import DistributedEnv, barrier

_TEMP_PREFIX = ".tmp-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, content: str | bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(content.encode() if isinstance(content, str) else content)
        handle.flush()
        os.fsync(handle.fileno())


def _tensor_bytes(state: Any) -> int:
    """The bytes of the tensors in a (nested) state dict: about what its checkpoint takes."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_tensor_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_tensor_bytes(value) for value in state)
    return 0


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


class Checkpointer:
    """Saves and restores the whole training state; keeps the newest `keep_last_n`.

    `trainable_only`: frozen parameters (a LoRA run's base) are neither saved nor loaded.
    """

    def __init__(self, directory: Path, keep_last_n: int, env: DistributedEnv, trainable_only: bool = False):
        self.directory = Path(directory)
        self.keep_last_n = keep_last_n
        self.env = env
        self.options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)

    def remove_incomplete(self) -> None:
        """Delete temp directories left by a crash during a save."""
        if self.env.is_main and self.directory.is_dir():
            for path in self.directory.iterdir():
                if path.name.startswith(_TEMP_PREFIX):
                    shutil.rmtree(path, ignore_errors=True)
        barrier(self.env)

    def _state(self, model, optimizer, scheduler, trainer: dict, data: dict) -> dict[str, Any]:
        model_state, optimizer_state = get_state_dict(model, optimizer, options=self.options)
        return {
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            # JSON text keeps these small nested states single entries (DCP would split dicts).
            "trainer": json.dumps(trainer),
            "data": json.dumps(data),
            # RNG streams differ per rank, so each rank saves its own under its own key.
            f"rng_rank{self.env.rank}": rng_state(self.env.device),
        }

    def save(self, step: int, model, optimizer, scheduler, trainer: dict, data: dict,
             model_config_json: str, run_config: dict, extra_files: dict[str, bytes] | None = None) -> Path:
        """Write the checkpoint of `step` atomically; `extra_files` (relative path -> content, given
        on rank 0) are written inside it before it gets its final name."""
        final = self.directory / checkpoint_name(step)
        temp = self.directory / f"{_TEMP_PREFIX}{final.name}"
        if self.env.is_main:
            shutil.rmtree(temp, ignore_errors=True)
            temp.mkdir(parents=True)
        barrier(self.env)
        state = self._state(model, optimizer, scheduler, trainer, data)
        # A failed save (a full disk) leaves no temp directory behind; the checkpoints before it stay.
        cleanup = (lambda: shutil.rmtree(temp, ignore_errors=True)) if self.env.is_main else (lambda: None)
        with full_disk_reported(final, _tensor_bytes(state), cleanup):
            with single_process_quietly():
                dcp.save(state, storage_writer=dcp.FileSystemWriter(temp, sync_files=True),
                         no_dist=not self.env.is_distributed)
            if self.env.is_main:
                _write_synced(temp / TRAINING_MODEL_CONFIG, model_config_json)
                _write_synced(temp / TRAINING_RUN_CONFIG, yaml.safe_dump(run_config, sort_keys=False))
                for name, content in (extra_files or {}).items():
                    (temp / name).parent.mkdir(parents=True, exist_ok=True)
                    _write_synced(temp / name, content)
                    _fsync_dir((temp / name).parent)
                _fsync_dir(temp)
        if self.env.is_main:
            if final.exists():  # the same step saved before (a resumed run that ends where it began)
                stale = self.directory / f"{_TEMP_PREFIX}old-{final.name}"
                final.rename(stale)
                temp.rename(final)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                temp.rename(final)
            _fsync_dir(self.directory)
            for old in list_checkpoints(self.directory)[: -self.keep_last_n]:
                shutil.rmtree(old, ignore_errors=True)
        barrier(self.env)
        return final

    def load(self, path: Path, model, optimizer, scheduler) -> tuple[dict, dict]:
        """Restore model, optimizer, scheduler and this rank's RNG; return (trainer, data) states."""
        available = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        state = self._state(model, optimizer, scheduler, trainer={}, data={})
        rng_key = f"rng_rank{self.env.rank}"
        if not any(key.startswith(rng_key + ".") or key == rng_key for key in available):
            # Resumed with more ranks than saved it: those ranks start fresh RNG streams.
            warnings.warn(f"{path} holds no RNG state for rank {self.env.rank}; its RNG is not restored")
            del state[rng_key]
        with single_process_quietly():
            dcp.load(state, checkpoint_id=path, no_dist=not self.env.is_distributed)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=self.options)
        scheduler.load_state_dict(state["scheduler"])
        if rng_key in state:
            set_rng_state(state[rng_key], self.env.device)
        return json.loads(state["trainer"]), json.loads(state["data"])


def load_full_model_state(model: nn.Module, full_state: dict[str, torch.Tensor], env: DistributedEnv) -> None:
    """Load an unsharded state dict held by rank 0 into a (possibly sharded) model."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=env.is_distributed)
    set_model_state_dict(model, full_state if env.is_main or not env.is_distributed else {}, options=options)

