"""LoRA runs (the `lora:` section): the adapted model and the files that each checkpoint carries
beside its DCP state (the identity of its base is worked out when the run is resolved).

The frozen base is held in the compute dtype of train.precision (bf16 weights that never step need
no fp32 master copy), its block projections optionally quantized; the adapters are fp32. A LoRA
run's checkpoints hold only the adapters with their optimizer state, data position and RNG (the base
is read again from model.init_from on resume), so each also records the base it belongs to
(`base_identity.json`) and a resume against another base is refused. Each holds the adapter in
PEFT's format too (`adapter/`), and the run's last one is copied to `{output_dir}/adapter`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from mptkit.adapters import (
    BASE_IDENTITY,
    CHECKPOINT_ADAPTER_DIR,
    BaseIdentity,
    adapter_files,
    add_lora,
    quantize_base,
    read_base_identity,
)
from mptkit.files import staged
from mptkit.model import MPTForCausalLM

from .config import ConfigError, ResolvedRun
from .parallel import DistributedEnv


def check_launch(run: ResolvedRun, env: DistributedEnv) -> None:
    """The check of the lora section that needs the launch (`resolve` made the others)."""
    quantization = run.lora.base_quantization
    if quantization != "none" and env.is_distributed:
        raise ConfigError(f"{quantization} (a compact frozen base) trains in one process (FSDP2 shards the base's "
                          "weights as they are); under torchrun use base_quantization: none, with train.precision: bf16 for a bf16 "
                          "base", field="lora.base_quantization")


def adapt(base: nn.Module, run: ResolvedRun, device: torch.device) -> nn.Module:
    """The run's base (on CPU, in run.read_dtype) made compact as asked and with its adapters injected,
    their initialisation drawn from `seed` (the same on every rank and for every world size)."""
    quantize_base(base, run.lora.base_quantization, run.compute_dtype, device)
    torch.manual_seed(run.config.seed)
    return add_lora(base, run.lora, run.lora_base.path)


def meta_skeleton(run: ResolvedRun) -> nn.Module:
    """The adapted model on the meta device, to parallelize before any rank allocates it."""
    with torch.device("meta"):
        model = MPTForCausalLM(run.model_config).to(run.compute_dtype)
        return add_lora(model, run.lora)


def checkpoint_files(model: nn.Module, run: ResolvedRun, env: DistributedEnv) -> dict[str, bytes]:
    """The files a LoRA checkpoint carries (gathered from every rank: call it on all; rank 0 gets them)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(model, options=options)
    if not env.is_main:
        return {}
    files = adapter_files(model, state, run.lora, run.lora_base)
    return {BASE_IDENTITY: files[BASE_IDENTITY], **{f"{CHECKPOINT_ADAPTER_DIR}/{name}": data for name, data in files.items()}}


def check_resume(checkpoint: Path, identity: BaseIdentity | None) -> None:
    """Refuse a checkpoint of another kind of run, or LoRA adapters of another base."""
    saved = read_base_identity(checkpoint)
    if saved is None and identity is None:
        return
    if identity is None:
        raise ConfigError(f"{checkpoint} is a LoRA run's checkpoint (adapter weights only, base {saved.short()}); "
                          "resume it with the run's lora section, or start this run elsewhere (another "
                          "checkpoint.dir)", field="checkpoint.resume")
    if saved is None:
        raise ConfigError(f"{checkpoint} holds a full training state, not LoRA adapters; to LoRA-tune that model set "
                          "model.init_from to it and use another checkpoint.dir", field="checkpoint.resume")
    if saved.sha256 != identity.sha256:
        raise ConfigError(f"{checkpoint} holds LoRA adapters trained on the base {saved.short()}, but this run's base "
                          f"is {identity.short()}: an adapter fits only the base it was trained on. Point "
                          "model.init_from at that base, or start a new run (another checkpoint.dir)",
                          field="checkpoint.resume")


def publish_adapter(checkpoint: Path, output_dir: Path) -> Path:
    """Copy a checkpoint's PEFT adapter to `output_dir/adapter` (the run's result; rank 0)."""
    target = Path(output_dir) / CHECKPOINT_ADAPTER_DIR
    source = checkpoint / CHECKPOINT_ADAPTER_DIR
    with staged(target, sum(f.stat().st_size for f in source.iterdir())) as temp:
        shutil.copytree(source, temp)
    return target
