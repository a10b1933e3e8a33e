"""Optimizers (AdamW, DecoupledLionW) with MPT's weight-decay grouping, and learning-rate schedules.

Weight decay is decoupled in MosaicML's sense: each step multiplies a weight by
(1 - weight_decay * lr / peak_lr), so the decay follows the schedule's shape but not the lr's scale.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimizerConfig, ScheduleConfig


class DecoupledLionW(torch.optim.Optimizer):
    """Lion (Chen et al. 2023) with decoupled weight decay, as MPT-7B was trained.

    update = sign(beta1 * m + (1 - beta1) * g);  m <- beta2 * m + (1 - beta2) * g;
    w <- w * (1 - weight_decay * lr / initial_lr) - lr * update.
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))
        for group in self.param_groups:
            # The lr the decay is scaled against; LambdaLR records the same value under this name.
            group.setdefault("initial_lr", group["lr"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), decay = group["lr"], group["betas"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param)
                exp_avg = state["exp_avg"]
                if decay:
                    param.mul_(1.0 - decay * lr / group["initial_lr"])
                update = exp_avg.lerp(grad, 1.0 - beta1).sign_()
                param.add_(update, alpha=-lr)
                exp_avg.lerp_(grad, 1.0 - beta2)
        return loss


def parameter_groups(model: nn.Module, config: OptimizerConfig) -> list[dict]:
    """Split parameters into decayed and undecayed groups.

    Undecayed unless asked: embeddings (any nn.Embedding, so a tied output matrix too), and every
    parameter with fewer than two dimensions (norm weights, biases).
    """
    decayed, undecayed, seen = [], [], set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, nn.Embedding):
                decay = config.decay_embeddings
            elif param.ndim < 2:
                decay = config.decay_norms_and_biases
            else:
                decay = True
            (decayed if decay else undecayed).append(param)
    groups = [{"params": decayed, "weight_decay": config.weight_decay}]
    if undecayed:
        groups.append({"params": undecayed, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config)
    if config.name == "lion":
        return DecoupledLionW(groups, lr=config.lr, betas=config.betas)
    # torch's AdamW decays by lr * weight_decay; dividing by the peak lr gives the decoupled form.
    for group in groups:
        group["weight_decay"] = group["weight_decay"] / config.lr
    # fused: one kernel for the whole update (CPU and CUDA, sharded DTensor parameters included).
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=True)


def lr_factor(step: int, schedule: ScheduleConfig, max_steps: int) -> float:
    """Multiplier of the peak lr for the update at 0-based `step`.

    Warmup rises linearly to 1 at step warmup_steps - 1; the decay then runs from 1 at step
    warmup_steps to final_lr_ratio at the last step (max_steps - 1).
    """
    warmup = schedule.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if schedule.name == "constant":
        return 1.0
    decay_steps = max(max_steps - 1 - warmup, 1)
    progress = min((step - warmup) / decay_steps, 1.0)
    floor = schedule.final_lr_ratio
    if schedule.name == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleConfig, max_steps: int):
    # A plain function (not an object) so that the scheduler's state_dict holds only its position:
    # a resumed run may change the schedule, e.g. to train longer.
    def factor(step: int) -> float:
        return lr_factor(step, schedule, max_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each parameter group's settings (lr, betas, decay, ...), without its parameters."""
    return [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]


def reapply_hyperparameters(optimizer: torch.optim.Optimizer, scheduler, configured: list[dict]) -> None:
    """After a checkpoint load, let the run's config win over the saved settings.

    Loading restores the optimizer's saved hyperparameters; a resumed run may change the lr, betas,
    decay or schedule, so the configured ones are put back and the lr recomputed at the restored
    position of the schedule (with unchanged settings this reproduces the saved values exactly).
    """
    for group, settings in zip(optimizer.param_groups, configured):
        group.update(settings)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = group["initial_lr"] * factor(scheduler.last_epoch)
