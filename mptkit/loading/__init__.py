"""Reading a model from wherever a user points: the one loader of inference, eval, export, serve and
a training run's `model.init_from`.

A location is one of (one class each, `sources.py`; callers never ask which):
- an HF-format directory: an mptkit export, `save_pretrained` output, or a hub download
  (mosaicml/mpt-7b*) with `model.safetensors`, sharded safetensors (`*.index.json`) or `.bin` files;
- a training checkpoint of `mptkit train` (a `step_*` DCP directory), or the directory holding
  them (its newest complete one is read);
- a Composer / llm-foundry checkpoint file (`*.pt`, read by `composer.py`);
- a hub name, `org/name` or `org/name@revision`, when no such path exists (`hub.py`): read from
  huggingface_hub's cache, downloading only what mptkit reads, and pinned to the commit it resolved to.

It becomes a model in eval mode, its tokenizer, and the `ModelSource` that was read (`model.py`). One
dtype vocabulary (`dtypes.py`) and one tokenizer rule serve every caller. The training area writes
checkpoints; the read side of their format lives here (`checkpoints.py`) so that nothing that only
reads a model depends on the trainer. This module only re-exports.
"""

from .checkpoints import (
    CHECKPOINTS_DIR,
    TRAINING_MODEL_CONFIG,
    TRAINING_RUN_CONFIG,
    CheckpointError,
    checkpoint_name,
    is_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_dcp_model_weights,
    read_run_config,
    resolve_checkpoint,
    single_process_quietly,
    training_run_tokenizer,
)
from .dtypes import DTYPES, cpu_supports_bf16, resolve_dtype
from .hub import HubError, HubRepo
from .model import (
    LoadedModel,
    find_adapter,
    load,
    load_model,
    load_tokenizer_for,
    read_model_config,
    tokenizer_location,
)
from .sources import ComposerFile, HFDirectory, ModelSource, TrainingCheckpoint, find_source
from .weights import check_safetensors, check_weight_files, weight_files

__all__ = [
    "CHECKPOINTS_DIR", "DTYPES", "TRAINING_MODEL_CONFIG", "TRAINING_RUN_CONFIG", "CheckpointError",
    "ComposerFile", "HFDirectory", "HubError", "HubRepo", "LoadedModel", "ModelSource", "TrainingCheckpoint",
    "check_safetensors", "check_weight_files", "checkpoint_name", "cpu_supports_bf16", "find_adapter", "find_source",
    "is_checkpoint", "latest_checkpoint", "list_checkpoints", "load", "load_dcp_model_weights", "load_model",
    "load_tokenizer_for", "read_model_config", "read_run_config", "resolve_checkpoint", "resolve_dtype",
    "single_process_quietly", "tokenizer_location", "training_run_tokenizer", "weight_files",
]
