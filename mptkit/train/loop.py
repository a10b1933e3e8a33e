"""The training loop: one function, `train(config)`, for pretraining and fine-tuning alike.

Per optimizer step every rank takes its share of the global batch as micro-batches, sums the
token cross-entropy, divides by the number of target tokens in the whole global batch (so the
gradient is the same whatever the world size and accumulation), clips, checks the loss, steps.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mptkit.model import MPTConfig, MPTForCausalLM

from .checkpoint import (
    Checkpointer,
    is_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_full_model_state,
    load_model_weights,
    model_config_dict,
    resolve_checkpoint,
)
from .config import ConfigError, RunConfig
from .data import build_train_stream, build_val_source
from .metrics import MetricsLogger, flops_per_token, peak_tflops, plot_loss_curve
from .optim import build_optimizer, build_scheduler, hyperparameters, reapply_hyperparameters
from .parallel import DistributedEnv, all_reduce_sum, parallelize, setup_distributed, teardown_distributed


class TrainingHalted(RuntimeError):
    """The loss went bad (NaN/Inf or a spike) and the anomaly policy says stop."""


@dataclass
class TrainResult:
    step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> train loss, steps run here
    val_loss: float | None = None
    checkpoint: Path | None = None


# ---- model --------------------------------------------------------------------------------------


def init_checkpoint(config: RunConfig) -> Path | None:
    """The training checkpoint named by model.init_from (it or the newest inside it), if it is one."""
    if config.model.init_from is None:
        return None
    source = Path(config.model.init_from)
    return source if is_checkpoint(source) else latest_checkpoint(source)


def resolve_model_config(config: RunConfig) -> MPTConfig:
    """The MPTConfig of the run: a preset or the `init_from` model's, with the overrides merged."""
    section = config.model
    if section.init_from is None:
        return MPTConfig.from_preset(section.preset, **json.loads(json.dumps(section.overrides)))
    source = Path(section.init_from)
    if (checkpoint := init_checkpoint(config)) is not None:
        fields = model_config_dict(checkpoint)
    elif (source / "config.json").is_file():
        fields = json.loads((source / "config.json").read_text())
    else:
        raise ConfigError(f"model.init_from: {source} is neither an HF-format model directory (config.json) "
                          "nor a training checkpoint (.metadata) or a directory of them")
    for key, value in section.overrides.items():
        if isinstance(value, dict) and isinstance(fields.get(key), dict):
            fields[key] = {**fields[key], **value}
        else:
            fields[key] = value
    return MPTConfig(**fields)


def _initial_state(config: RunConfig, model_config: MPTConfig) -> dict[str, torch.Tensor]:
    """Full starting weights, built on CPU so that they do not depend on device or world size."""
    if config.model.init_from is not None:
        pretrained = MPTForCausalLM.from_pretrained(config.model.init_from, config=model_config,
                                                    dtype=torch.float32)
        return pretrained.state_dict()
    with torch.device("meta"):
        model = MPTForCausalLM(model_config)
    model.to_empty(device="cpu")
    torch.manual_seed(config.seed)
    model.reset_parameters()
    return model.state_dict()


def build_model(config: RunConfig, model_config: MPTConfig, env: DistributedEnv, initialize: bool) -> nn.Module:
    """Meta-device model -> parallelize -> allocate -> initial weights (unless a resume loads them)."""
    with torch.device("meta"):
        model = MPTForCausalLM(model_config)
    parallelize(model, config.train, config.parallel, env)
    model.to_empty(device=env.device)
    if initialize:
        if (checkpoint := init_checkpoint(config)) is not None:
            load_model_weights(model, checkpoint)
        else:
            state = _initial_state(config, model_config) if env.is_main else {}
            load_full_model_state(model, state, env)
    model.train()
    return model


# ---- one step's arithmetic ----------------------------------------------------------------------


def target_count(labels: torch.Tensor) -> torch.Tensor:
    """Tokens that contribute to the loss: positions 1.. whose label is not -100."""
    return (labels[:, 1:] != -100).sum()


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy in fp32 (labels shifted here, -100 ignored)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Fine-tuning batches are right-padded: under the causal mask no real token attends to a pad,
    # and pads carry label -100, so no attention mask is needed.
    inputs = {"input_ids": batch["input_ids"]}
    if "sequence_id" in batch:
        inputs["sequence_id"] = batch["sequence_id"]
    return inputs


def forward_backward(model: nn.Module, batch: dict[str, torch.Tensor], autocast, scale) -> torch.Tensor:
    """One micro-batch: backpropagate scale * (summed token cross-entropy); return the sum."""
    with autocast:
        logits = model(**model_inputs(batch)).logits
    summed = cross_entropy_sum(logits, batch["labels"])
    (summed * scale).backward()
    return summed.detach()


class LossWatch:
    """Judges each step's loss: finite, and not a spike over the mean of recent good losses."""

    def __init__(self, spike_factor: float, min_steps: int, history: list[float] = ()):
        self.spike_factor = spike_factor
        self.min_steps = min_steps
        self.recent: deque[float] = deque(history, maxlen=max(min_steps, 1) * 5)

    def problem(self, loss: float, grad_norm: float) -> str | None:
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if not math.isfinite(grad_norm):
            return f"gradient norm is {grad_norm}"
        if self.spike_factor and len(self.recent) >= self.min_steps:
            mean = sum(self.recent) / len(self.recent)
            if loss > self.spike_factor * mean:
                return f"loss {loss:.4f} spiked above {self.spike_factor} x the recent mean {mean:.4f}"
        return None

    def accept(self, loss: float) -> None:
        self.recent.append(loss)


# ---- the loop -----------------------------------------------------------------------------------


def train(config: RunConfig) -> TrainResult:
    env = setup_distributed(config.train, config.parallel)
    try:
        return run(config, env)
    finally:
        teardown_distributed()


def _resume_path(config: RunConfig) -> Path | None:
    resume, directory = config.checkpoint.resume, config.checkpoint_dir
    if resume == "auto":
        return latest_checkpoint(directory)
    if resume == "never":
        if list_checkpoints(directory):
            raise ConfigError(f"checkpoint.resume: 'never', but {directory} already holds checkpoints that this run "
                              "would mix with its own; use resume=auto, another checkpoint.dir, or delete them")
        return None
    return resolve_checkpoint(resume)


def run(config: RunConfig, env: DistributedEnv) -> TrainResult:
    train_cfg = config.train
    per_step_rank = train_cfg.global_batch_size // env.world_size
    if train_cfg.global_batch_size % (train_cfg.micro_batch_size * env.world_size):
        raise ConfigError(f"train.global_batch_size={train_cfg.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size={train_cfg.micro_batch_size} x world size {env.world_size}")
    accumulation = per_step_rank // train_cfg.micro_batch_size
    # Per-rank streams (dropout differs across ranks); the initial weights reseed with `seed` itself.
    random.seed(config.seed + env.rank)
    np.random.seed(config.seed + env.rank)
    torch.manual_seed(config.seed + env.rank)

    model_config = resolve_model_config(config)
    seq_len = train_cfg.seq_len or model_config.max_seq_len
    if seq_len > model_config.max_seq_len:
        raise ConfigError(f"train.seq_len={seq_len} exceeds model.max_seq_len={model_config.max_seq_len}")
    train_stream = build_train_stream(config, seq_len, env)
    val_source = build_val_source(config, seq_len, env)

    checkpointer = Checkpointer(config.checkpoint_dir, config.checkpoint.keep_last_n, env)
    checkpointer.remove_incomplete()
    resume_from = _resume_path(config)
    model = build_model(config, model_config, env, initialize=resume_from is None)
    optimizer = build_optimizer(model, config.optimizer)
    scheduler = build_scheduler(optimizer, config.schedule, train_cfg.max_steps)
    step, tokens_seen, history = 0, 0, []
    if resume_from is not None:
        configured = hyperparameters(optimizer)
        trainer_state, data_state = checkpointer.load(resume_from, model, optimizer, scheduler)
        reapply_hyperparameters(optimizer, scheduler, configured)
        step, tokens_seen, history = trainer_state["step"], trainer_state["tokens_seen"], trainer_state["recent_losses"]
        train_stream.load_state_dict(data_state)
    watch = LossWatch(config.anomaly.spike_factor, config.anomaly.spike_min_steps, history)

    n_params = sum(p.numel() for p in model.parameters())  # global sizes, also for sharded DTensors
    peak, peak_source = (peak_tflops(train_cfg.precision, env.device, config.logging.peak_tflops)
                         if env.is_main else (float("nan"), ""))
    output_dir = Path(config.output_dir)
    run_dict = config.to_dict()
    logger = MetricsLogger(config.logging, output_dir, config.name, run_dict, enabled=env.is_main,
                           fresh=resume_from is None)
    if env.is_main:
        if resume_from is not None:
            start = f"resuming from {resume_from} at step {step}"
        elif config.model.init_from is not None:
            start = f"starting from the weights of {init_checkpoint(config) or config.model.init_from}"
        else:
            start = f"starting from a fresh initialisation (seed {config.seed})"
        tqdm.write(f"[mptkit train] {config.name}: {n_params / 1e6:.1f}M parameters, {env.world_size} rank(s) on "
                   f"{env.device.type}, {train_cfg.precision}, global batch {train_cfg.global_batch_size} x {seq_len} "
                   f"tokens ({accumulation} accumulation step(s)); MFU against {peak:.2f} TFLOP/s ({peak_source}); "
                   f"{start}")
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=train_cfg.precision == "bf16")
    result = TrainResult(step=step)
    last_saved = resume_from
    skipped_in_row = 0
    bar = tqdm(total=train_cfg.max_steps, initial=step, desc=config.name, dynamic_ncols=True,
               disable=not (env.is_main and config.logging.progress_bar))

    def save() -> Path:
        trainer_state = {"step": step, "tokens_seen": tokens_seen, "recent_losses": list(watch.recent)}
        return checkpointer.save(step, model, optimizer, scheduler, trainer_state, train_stream.state_dict(),
                                 model_config.to_json_string(), run_dict)

    try:
        while step < train_cfg.max_steps:
            started = time.perf_counter()
            micro_batches = [
                {k: v.to(env.device, non_blocking=True) for k, v in train_stream.next_batch().items()}
                for _ in range(accumulation)
            ]
            targets = all_reduce_sum(
                torch.stack([target_count(b["labels"]) for b in micro_batches]).sum().to(torch.float64), env
            )
            loss_sum = torch.zeros((), device=env.device, dtype=torch.float64)
            step_flops, step_tokens = 0, 0
            for index, batch in enumerate(micro_batches):
                if env.is_distributed:
                    # Reduce-scatter gradients once per step, on the last micro-batch.
                    model.set_requires_gradient_sync(index == accumulation - 1)
                # FSDP averages gradients over ranks; the world-size factor turns that into a sum.
                loss_sum += forward_backward(model, batch, autocast, env.world_size / targets.float())
                rows, length = batch["input_ids"].shape
                step_tokens += rows * length
                step_flops += rows * length * flops_per_token(n_params, model_config.n_layers, model_config.d_model,
                                                              length)
            loss = (all_reduce_sum(loss_sum, env) / targets).item()
            grad_norm = _clip_gradients(model, train_cfg.grad_clip_norm)
            problem = watch.problem(loss, grad_norm)
            if problem is None:
                optimizer.step()
                watch.accept(loss)
                skipped_in_row = 0
            optimizer.zero_grad(set_to_none=True)
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            step += 1
            tokens_seen += step_tokens * env.world_size
            result.losses[step] = loss
            if problem is not None:
                skipped_in_row += 1
                where = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was saved yet"
                if config.anomaly.policy == "stop" or skipped_in_row > config.anomaly.max_consecutive_skips:
                    logger.log(step, {"loss": loss, "grad_norm": grad_norm, "halted": problem})
                    raise TrainingHalted(
                        f"step {step}: {problem}; stopping (anomaly.policy={config.anomaly.policy}, "
                        f"{skipped_in_row} bad step(s) in a row). Nothing was saved after the bad step: {where}. "
                        "Resume from it with a lower optimizer.lr or with anomaly.policy=skip."
                    )
                tqdm.write(f"[mptkit train] step {step}: {problem}; update skipped ({skipped_in_row} in a row)")

            elapsed = time.perf_counter() - started
            tokens_per_s = step_tokens * env.world_size / elapsed
            mfu = step_flops / elapsed / (peak * 1e12)
            if step % config.logging.interval == 0 or step == train_cfg.max_steps:
                row = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "mfu": mfu,
                       "tokens_seen": tokens_seen, "step_time_s": elapsed}
                if problem is not None:
                    row["skipped"] = problem
                logger.log(step, row)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", mfu=f"{mfu:.1%}")

            if val_source is not None and config.eval.interval and step % config.eval.interval == 0:
                result.val_loss = _validate(model, val_source, autocast, env, config, logger, step)
            if config.checkpoint.interval and step % config.checkpoint.interval == 0:
                last_saved = save()
        if last_saved is None or not last_saved.name.endswith(f"{step:08d}"):
            last_saved = save()
        result.checkpoint = last_saved
        if val_source is not None and not (config.eval.interval and step % config.eval.interval == 0):
            result.val_loss = _validate(model, val_source, autocast, env, config, logger, step)
    finally:
        bar.close()
        logger.close()
        # Also after a halt: the curve shows how the loss went bad.
        if env.is_main and config.logging.jsonl and config.logging.loss_curve_png and logger.jsonl_path.exists():
            plot_loss_curve(logger.jsonl_path, output_dir / "loss_curve.png", config.name)
    result.step = step
    return result


def _clip_gradients(model: nn.Module, max_norm: float | None) -> float:
    """Clip to max_norm (if set) and return the total gradient norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return norm.item()


@torch.no_grad()
def _validate(model, val_source, autocast, env, config: RunConfig, logger: MetricsLogger, step: int) -> float:
    """Token-weighted validation loss over up to eval.max_batches micro-batches per rank."""
    model.eval()
    totals = torch.zeros(2, device=env.device, dtype=torch.float64)  # (loss sum, target count)
    for batch in val_source.batches(config.eval.max_batches):
        batch = {k: v.to(env.device) for k, v in batch.items()}
        with autocast:
            logits = model(**model_inputs(batch)).logits
        totals[0] += cross_entropy_sum(logits, batch["labels"])
        totals[1] += target_count(batch["labels"])
    model.train()
    loss_sum, count = all_reduce_sum(totals, env).tolist()
    val_loss = loss_sum / max(count, 1)
    logger.log(step, {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "val_tokens": int(count)})
    if env.is_main:
        tqdm.write(f"[mptkit train] step {step}: validation loss {val_loss:.4f}, perplexity {math.exp(min(val_loss, 50)):.2f}")
    return val_loss

