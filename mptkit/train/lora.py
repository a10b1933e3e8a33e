"""LoRA runs (the `lora:` section): the adapted model, the identity of its base, and the files that
each checkpoint carries beside its DCP state.

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
    LoraSpec,
    adapter_files,
    add_lora,
    base_identity,
    quantize_base,
    read_base_identity,
)
from mptkit.loading import ModelSource, source_identity
from mptkit.model import MPTConfig, MPTForCausalLM

from .config import ConfigError, LoraConfig, RunConfig, lora_problems
from .parallel import DistributedEnv


def lora_spec(lora: LoraConfig) -> LoraSpec:
    return LoraSpec(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, target_modules=tuple(lora.target_modules),
                    modules_to_save=tuple(lora.modules_to_save))


def base_dtype(config: RunConfig) -> torch.dtype:
    return torch.bfloat16 if config.train.precision == "bf16" else torch.float32


def read_dtype(config: RunConfig) -> torch.dtype:
    """The dtype the base is read in: a bf16 or int8 base is read in bf16, so that the whole base is
    never held in fp32 (7B: 27 GB) on its way to the compact form."""
    return torch.bfloat16 if config.lora.base_quantization in ("bf16", "int8") else base_dtype(config)


def check_lora_run(config: RunConfig, model_config: MPTConfig, env: DistributedEnv) -> None:
    """The checks of the lora section that need the model or the launch (load_config made the rest)."""
    if config.model.init_from is not None:
        for key, message in lora_problems(config.lora, model_config):
            raise ConfigError(f"{message} (model of {config.model.init_from})", field=key)
    quantization = config.lora.base_quantization
    if quantization != "none" and env.is_distributed:
        raise ConfigError(f"{quantization} (a compact frozen base) trains in one process (FSDP2 shards the base's "
                          "weights as they are); under torchrun use base_quantization: none, with train.precision: bf16 for a bf16 "
                          "base", field="lora.base_quantization")
    if quantization == "nf4" and env.device.type != "cuda":
        raise ConfigError("nf4 needs CUDA (bitsandbytes' 4-bit kernels); on CPU use int8",
                          field="lora.base_quantization")


def run_base_identity(config: RunConfig, source: ModelSource | None) -> BaseIdentity:
    """The identity of the run's base: model.init_from's files, or the preset and seed it is drawn from."""
    if source is None:
        fields = {"preset": config.model.preset, "overrides": config.model.overrides, "seed": config.seed}
        return base_identity(None, fields)
    return source_identity(source)


def adapt(base: nn.Module, config: RunConfig, identity: BaseIdentity, device: torch.device) -> nn.Module:
    """The run's base (on CPU, in read_dtype) made compact as asked and with its adapters injected, their
    initialisation drawn from `seed` (the same on every rank and for every world size)."""
    quantize_base(base, config.lora.base_quantization, base_dtype(config), device)
    torch.manual_seed(config.seed)
    return add_lora(base, lora_spec(config.lora), identity.path)


def meta_skeleton(model_config: MPTConfig, config: RunConfig) -> nn.Module:
    """The adapted model on the meta device, to parallelize before any rank allocates it."""
    with torch.device("meta"):
        model = MPTForCausalLM(model_config).to(base_dtype(config))
        return add_lora(model, lora_spec(config.lora))


def checkpoint_files(model: nn.Module, config: RunConfig, identity: BaseIdentity, env: DistributedEnv) -> dict[str, bytes]:
    """The files a LoRA checkpoint carries (gathered from every rank: call it on all; rank 0 gets them)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(model, options=options)
    if not env.is_main:
        return {}
    files = adapter_files(model, state, lora_spec(config.lora), identity)
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
    temp = target.with_name(f".tmp-{CHECKPOINT_ADAPTER_DIR}")
    shutil.rmtree(temp, ignore_errors=True)
    shutil.copytree(checkpoint / CHECKPOINT_ADAPTER_DIR, temp)
    shutil.rmtree(target, ignore_errors=True)
    temp.rename(target)
    return target
