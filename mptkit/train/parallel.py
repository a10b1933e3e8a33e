"""Distributed setup and the parallelisms applied to a model from outside it.

The model is written for one device; `parallelize` switches on its blocks' activation
checkpointing (MPTBlock's own, the one transformers' API switches on too), and adds per-block
torch.compile and FSDP2 (`fully_shard` on every block, then on the root), torchtitan's order.
Under `torchrun` the process group comes from the environment it sets (RANK, WORLD_SIZE, ...):
gloo for CPU, nccl for CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .config import ParallelConfig, TrainConfig


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(train: TrainConfig, parallel: ParallelConfig) -> DistributedEnv:
    """Pick the device and, when launched by torchrun with several ranks, join the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = train.device == "cuda" or (train.device == "auto" and torch.cuda.is_available())
    if train.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but torch sees no CUDA device")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = parallel.backend if parallel.backend != "auto" else ("nccl" if use_cuda else "gloo")
        dist.init_process_group(backend=backend, device_id=device if use_cuda else None)
    return DistributedEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: nn.Module, train: TrainConfig, parallel: ParallelConfig, env: DistributedEnv) -> nn.Module:
    """Apply activation checkpointing, compilation and FSDP2 to `model.transformer.blocks`.

    Call on a model still on the meta device, then `to_empty()` and initialise (or load) it, so no
    rank ever holds the whole unsharded model.
    """
    blocks = model.transformer.blocks
    for block in blocks:
        # The block's own activation checkpointing (MPTBlock): its input kept, its forward rerun in backward.
        block.gradient_checkpointing = train.activation_checkpointing
        if train.compile:
            block.compile()  # in place: parameter names stay those of the uncompiled module
    if env.is_distributed:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        # bf16 runs gather bf16 weights (half the traffic) and reduce gradients in fp32; the
        # optimizer keeps fp32 master weights. Autocast still governs the compute dtype.
        if train.precision == "bf16":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            policy = MixedPrecisionPolicy()
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=parallel.reshard_after_forward)
        # The root group holds the embedding (tied to the output), norm_f and any lm_head.
        fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def all_reduce_sum(values: torch.Tensor, env: DistributedEnv) -> torch.Tensor:
    if env.is_distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier(env: DistributedEnv) -> None:
    if env.is_distributed:
        dist.barrier()
