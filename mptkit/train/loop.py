"""The training loop, pretraining and fine-tuning alike, in named parts.

`train(run)` runs a whole run (a `ResolvedRun` of `config.load_run` or `config.resolve`). Its parts:
- `build_training_state(run, env=None) -> TrainingState`: seeds, data, the model (meta device,
  parallelized, initialised or loaded), optimizer, schedule, and resumption from a checkpoint.
- `train_step(state) -> StepStats`: one optimizer step (loss, grad_norm, lr, tokens, flops, elapsed
  seconds, and the problem when the update was skipped); it advances `state.step`.
- `AnomalyPolicy`: what a bad step (NaN/Inf or a spike, judged by `LossWatch`) does: skip or stop.
- `TrainingLog`: what the user sees (banner, metrics rows, progress bar, loss curve).

Another caller can time real training steps with the same code (one process; the state resumes from
`checkpoint.dir` as `train` would, so point it at a fresh directory):

    state = build_training_state(run)
    seconds = [train_step(state).elapsed for _ in range(3)][1:]   # after a warm-up step

Per optimizer step every rank takes its share of the global batch as micro-batches, sums the
token cross-entropy, divides by the number of target tokens in the whole global batch (so the
gradient is the same whatever the world size and accumulation), clips, checks the loss, steps.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mptkit.loading import (
    TrainingCheckpoint,
    latest_checkpoint,
    list_checkpoints,
    load_dcp_model_weights,
    resolve_checkpoint,
)
from mptkit.model import MPTForCausalLM

from . import lora
from .checkpoint import Checkpointer, load_full_model_state
from .config import AnomalyConfig, ConfigError, ResolvedRun, RunConfig
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
    adapter: Path | None = None  # a LoRA run's PEFT adapter (output_dir/adapter)


# ---- model --------------------------------------------------------------------------------------


def initial_model(run: ResolvedRun) -> nn.Module:
    """The starting weights in a model on CPU in run.read_dtype, so that they do not depend on device or
    world size: init_from's (any source `mptkit.loading` reads), or the preset's seeded initialisation."""
    if run.source is not None:
        return run.source.load_weights(run.model_config, run.read_dtype)
    with torch.device("meta"):
        model = MPTForCausalLM(run.model_config).to(run.read_dtype)
    model.to_empty(device="cpu")
    torch.manual_seed(run.config.seed)
    model.reset_parameters()
    return model


def _build_lora_model(run: ResolvedRun, env: DistributedEnv) -> nn.Module:
    """The frozen base with adapters, always initialised (a LoRA checkpoint holds the adapters only):
    built on CPU in one process; under FSDP2 a meta skeleton is sharded and rank 0's weights broadcast."""
    config = run.config
    if not env.is_distributed:
        model = lora.adapt(initial_model(run), run, env.device)
        return parallelize(model, config.train, config.parallel, env).to(env.device).train()
    model = parallelize(lora.meta_skeleton(run), config.train, config.parallel, env)
    model.to_empty(device=env.device)
    full = lora.adapt(initial_model(run), run, torch.device("cpu")).state_dict() if env.is_main else {}
    load_full_model_state(model, full, env)
    return model.train()


def build_model(run: ResolvedRun, env: DistributedEnv, initialize: bool) -> nn.Module:
    """Meta-device model -> parallelize -> allocate -> initial weights (unless a resume loads them).
    A LoRA run builds its adapted model instead."""
    if run.lora is not None:
        return _build_lora_model(run, env)
    with torch.device("meta"):
        model = MPTForCausalLM(run.model_config)
    parallelize(model, run.config.train, run.config.parallel, env)
    model.to_empty(device=env.device)
    if initialize:
        if isinstance(run.source, TrainingCheckpoint):
            load_dcp_model_weights(model, run.source.path)  # each rank reads its own shards
        else:
            state = initial_model(run).state_dict() if env.is_main else {}
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


# ---- setup --------------------------------------------------------------------------------------


@dataclass
class TrainingState:
    """Everything a run advances step by step: built by `build_training_state`, stepped by `train_step`."""

    run: ResolvedRun  # the config and what it resolved to (model config, seq_len, source, LoRA base)
    env: DistributedEnv
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_stream: Any
    val_source: Any  # None without validation data
    checkpointer: Checkpointer
    watch: LossWatch
    autocast: Any
    accumulation: int  # micro-batches per rank and optimizer step
    n_params: int  # global sizes, also for sharded DTensors
    n_trainable: int  # all but a LoRA run's frozen base
    resumed_from: Path | None = None
    step: int = 0
    tokens_seen: int = 0
    last_saved: Path | None = None  # the newest checkpoint of this run (or the one it resumed from)

    @property
    def config(self) -> RunConfig:
        return self.run.config


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


def _accumulation_steps(config: RunConfig, env: DistributedEnv) -> int:
    train_cfg = config.train
    if train_cfg.global_batch_size % (train_cfg.micro_batch_size * env.world_size):
        raise ConfigError(f"train.global_batch_size={train_cfg.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size={train_cfg.micro_batch_size} x world size {env.world_size}")
    return train_cfg.global_batch_size // env.world_size // train_cfg.micro_batch_size


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_training_state(run: ResolvedRun, env: DistributedEnv | None = None) -> TrainingState:
    """Set up a run: seeds, data, model, optimizer, schedule, and the checkpoint it resumes from.

    `env` defaults to `setup_distributed(config.train, config.parallel)` (one process unless
    launched by torchrun).
    """
    config = run.config
    env = env or setup_distributed(config.train, config.parallel)
    accumulation = _accumulation_steps(config, env)
    if run.lora is not None:
        lora.check_launch(run, env)
    # Per-rank streams (dropout differs across ranks); the initial weights reseed with `seed` itself.
    _seed(config.seed + env.rank)
    train_stream = build_train_stream(config, run.seq_len, env)
    val_source = build_val_source(config, run.seq_len, env)

    checkpointer = Checkpointer(config.checkpoint_dir, config.checkpoint.keep_last_n, env,
                                trainable_only=run.lora is not None)
    checkpointer.remove_incomplete()
    resume_from = _resume_path(config)
    if resume_from is not None:
        lora.check_resume(resume_from, run.lora_base)
    model = build_model(run, env, initialize=resume_from is None)
    optimizer = build_optimizer(model, config.optimizer)
    scheduler = build_scheduler(optimizer, config.schedule, config.train.max_steps)
    trainer = {"step": 0, "tokens_seen": 0, "recent_losses": []}
    if resume_from is not None:
        configured = hyperparameters(optimizer)
        trainer, data_state = checkpointer.load(resume_from, model, optimizer, scheduler)
        reapply_hyperparameters(optimizer, scheduler, configured)
        train_stream.load_state_dict(data_state)
    return TrainingState(
        run=run, env=env, model=model, optimizer=optimizer, scheduler=scheduler,
        train_stream=train_stream, val_source=val_source, checkpointer=checkpointer,
        watch=LossWatch(config.anomaly.spike_factor, config.anomaly.spike_min_steps, trainer["recent_losses"]),
        autocast=torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=config.train.precision == "bf16"),
        accumulation=accumulation, n_params=sum(p.numel() for p in model.parameters()),
        n_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        resumed_from=resume_from, step=trainer["step"], tokens_seen=trainer["tokens_seen"], last_saved=resume_from,
    )


def save_checkpoint(state: TrainingState) -> Path:
    """Checkpoint the whole state at its step; it becomes `state.last_saved`."""
    trainer = {"step": state.step, "tokens_seen": state.tokens_seen, "recent_losses": list(state.watch.recent)}
    extra = lora.checkpoint_files(state.model, state.run, state.env) if state.run.lora is not None else None
    state.last_saved = state.checkpointer.save(
        state.step, state.model, state.optimizer, state.scheduler, trainer, state.train_stream.state_dict(),
        state.run.model_config.to_json_string(), state.config.to_dict(), extra_files=extra)
    return state.last_saved


# ---- one optimizer step -------------------------------------------------------------------------


@dataclass(frozen=True)
class StepStats:
    """What one optimizer step did."""

    step: int  # the step just completed, counted from 1
    loss: float  # token-mean training loss over the global batch
    grad_norm: float  # total gradient norm before clipping
    lr: float  # the learning rate of this step's update
    tokens: int  # tokens processed, all ranks together
    tokens_seen: int  # tokens of the run so far, this step included
    flops: int  # model FLOPs of this rank (MFU compares them with one device's peak)
    elapsed: float  # wall-clock seconds
    problem: str | None  # why the update was skipped (LossWatch), None when it was applied

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed

    def mfu(self, peak_tflops: float) -> float:
        return self.flops / self.elapsed / (peak_tflops * 1e12)


def _accumulate_gradients(state: TrainingState, micro_batches: list[dict]) -> tuple[float, int, int]:
    """Backpropagate every micro-batch; return (global token-mean loss, tokens of all ranks, this rank's FLOPs)."""
    env, model_config = state.env, state.run.model_config
    targets = all_reduce_sum(
        torch.stack([target_count(b["labels"]) for b in micro_batches]).sum().to(torch.float64), env
    )
    loss_sum = torch.zeros((), device=env.device, dtype=torch.float64)
    flops, tokens = 0, 0
    # A frozen weight takes no weight-gradient matmul: 2 of the 6 FLOPs per parameter and token.
    frozen = state.n_params - state.n_trainable
    for index, batch in enumerate(micro_batches):
        if env.is_distributed:
            # Reduce-scatter gradients once per step, on the last micro-batch.
            state.model.set_requires_gradient_sync(index == state.accumulation - 1)
        # FSDP averages gradients over ranks; the world-size factor turns that into a sum.
        loss_sum += forward_backward(state.model, batch, state.autocast, env.world_size / targets.float())
        rows, length = batch["input_ids"].shape
        tokens += rows * length
        flops += rows * length * (flops_per_token(state.n_params, model_config.n_layers, model_config.d_model, length)
                                  - 2 * frozen)
    loss = (all_reduce_sum(loss_sum, env) / targets).item()
    return loss, tokens * env.world_size, flops


def train_step(state: TrainingState) -> StepStats:
    """One optimizer step over the global batch: gradients, clipping, the update (skipped when the
    loss watch finds a problem; the policy then decides whether the run goes on) and the schedule."""
    started = time.perf_counter()
    micro_batches = [
        {k: v.to(state.env.device, non_blocking=True) for k, v in state.train_stream.next_batch().items()}
        for _ in range(state.accumulation)
    ]
    loss, tokens, flops = _accumulate_gradients(state, micro_batches)
    grad_norm = _clip_gradients(state.model, state.config.train.grad_clip_norm)
    problem = state.watch.problem(loss, grad_norm)
    if problem is None:
        state.optimizer.step()
        state.watch.accept(loss)
    state.optimizer.zero_grad(set_to_none=True)
    lr = state.optimizer.param_groups[0]["lr"]
    state.scheduler.step()
    state.step += 1
    state.tokens_seen += tokens
    return StepStats(step=state.step, loss=loss, grad_norm=grad_norm, lr=lr, tokens=tokens,
                     tokens_seen=state.tokens_seen, flops=flops, elapsed=time.perf_counter() - started,
                     problem=problem)


# ---- the anomaly policy -------------------------------------------------------------------------


class AnomalyPolicy:
    """What a bad step does (anomaly.policy): stop the run, or go on with its update skipped, until
    more than anomaly.max_consecutive_skips bad steps come in a row."""

    def __init__(self, config: AnomalyConfig):
        self.config = config
        self.bad_in_row = 0

    def review(self, stats: StepStats) -> Literal["go", "skip", "stop"]:
        if stats.problem is None:
            self.bad_in_row = 0
            return "go"
        self.bad_in_row += 1
        if self.config.policy == "stop" or self.bad_in_row > self.config.max_consecutive_skips:
            return "stop"
        return "skip"

    def skip_message(self, stats: StepStats) -> str:
        return f"[mptkit train] step {stats.step}: {stats.problem}; update skipped ({self.bad_in_row} in a row)"

    def halt(self, stats: StepStats, last_saved: Path | None) -> TrainingHalted:
        where = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was saved yet"
        return TrainingHalted(
            f"step {stats.step}: {stats.problem}; stopping (anomaly.policy={self.config.policy}, "
            f"{self.bad_in_row} bad step(s) in a row). Nothing was saved after the bad step: {where}. "
            "Resume from it with a lower optimizer.lr or with anomaly.policy=skip."
        )


# ---- logging ------------------------------------------------------------------------------------


class TrainingLog:
    """What the user sees of a run: the banner, metrics rows (JSONL, TensorBoard, W&B), the progress
    bar and, at the end (also after a halt: it shows how the loss went bad), the loss curve."""

    def __init__(self, state: TrainingState):
        config, env = state.config, state.env
        self.config, self.state = config, state
        self.peak, self.peak_source = (peak_tflops(config.train.precision, env.device, config.logging.peak_tflops)
                                       if env.is_main else (float("nan"), ""))
        self.metrics = MetricsLogger(config.logging, Path(config.output_dir), config.name, config.to_dict(),
                                     enabled=env.is_main, fresh=state.resumed_from is None)
        if env.is_main:
            tqdm.write(self._banner())
        self.bar = tqdm(total=config.train.max_steps, initial=state.step, desc=config.name, dynamic_ncols=True,
                        disable=not (env.is_main and config.logging.progress_bar))

    def _banner(self) -> str:
        state, config, train_cfg = self.state, self.config, self.config.train
        if state.resumed_from is not None:
            start = f"resuming from {state.resumed_from} at step {state.step}"
        elif state.run.source is not None:
            start = f"starting from the weights of {state.run.source.path}"
        else:
            start = f"starting from a fresh initialisation (seed {config.seed})"
        if state.run.lora is not None:
            quantized = config.lora.base_quantization
            base = quantized if quantized != "none" else str(state.run.compute_dtype).removeprefix("torch.")
            start += (f"; LoRA r={config.lora.rank} on {', '.join(config.lora.target_modules)}: "
                      f"{state.n_trainable / 1e6:.2f}M trainable, frozen base in {base}")
        return (f"[mptkit train] {config.name}: {state.n_params / 1e6:.1f}M parameters, {state.env.world_size} "
                f"rank(s) on {state.env.device.type}, {train_cfg.precision}, global batch "
                f"{train_cfg.global_batch_size} x {state.run.seq_len} tokens ({state.accumulation} accumulation step(s)); "
                f"MFU against {self.peak:.2f} TFLOP/s ({self.peak_source}); {start}")

    def step(self, stats: StepStats) -> None:
        tokens_per_s, mfu = stats.tokens_per_s, stats.mfu(self.peak)
        if stats.step % self.config.logging.interval == 0 or stats.step == self.config.train.max_steps:
            row = {"loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm, "tokens_per_s": tokens_per_s,
                   "mfu": mfu, "tokens_seen": stats.tokens_seen, "step_time_s": stats.elapsed}
            if stats.problem is not None:
                row["skipped"] = stats.problem
            self.metrics.log(stats.step, row)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{stats.lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                             mfu=f"{mfu:.1%}")

    def halted(self, stats: StepStats) -> None:
        self.metrics.log(stats.step, {"loss": stats.loss, "grad_norm": stats.grad_norm, "halted": stats.problem})

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()
        logging = self.config.logging
        if self.state.env.is_main and logging.jsonl and logging.loss_curve_png and self.metrics.jsonl_path.exists():
            plot_loss_curve(self.metrics.jsonl_path, Path(self.config.output_dir) / "loss_curve.png", self.config.name)


# ---- the loop -----------------------------------------------------------------------------------


def train(run: ResolvedRun) -> TrainResult:
    env = setup_distributed(run.config.train, run.config.parallel)
    try:
        return run_steps(run, env)
    finally:
        teardown_distributed()


def _due(step: int, interval: int) -> bool:
    return bool(interval) and step % interval == 0


def run_steps(run: ResolvedRun, env: DistributedEnv) -> TrainResult:
    """Steps to train.max_steps: policy, logging, periodic validation and checkpoints, a final save."""
    config = run.config
    state = build_training_state(run, env)
    log = TrainingLog(state)
    policy = AnomalyPolicy(config.anomaly)
    result = TrainResult(step=state.step)
    try:
        while state.step < config.train.max_steps:
            stats = train_step(state)
            result.losses[stats.step] = stats.loss
            verdict = policy.review(stats)
            if verdict == "stop":
                log.halted(stats)
                raise policy.halt(stats, state.last_saved)
            if verdict == "skip":
                tqdm.write(policy.skip_message(stats))
            log.step(stats)
            if state.val_source is not None and _due(state.step, config.eval.interval):
                result.val_loss = _validate(state, log.metrics)
            if _due(state.step, config.checkpoint.interval):
                save_checkpoint(state)
        if state.last_saved is None or not state.last_saved.name.endswith(f"{state.step:08d}"):
            save_checkpoint(state)
        result.checkpoint = state.last_saved
        if run.lora is not None and env.is_main:
            result.adapter = lora.publish_adapter(state.last_saved, Path(config.output_dir))
        if state.val_source is not None and not _due(state.step, config.eval.interval):
            result.val_loss = _validate(state, log.metrics)
    finally:
        log.close()
    result.step = state.step
    return result


def _clip_gradients(model: nn.Module, max_norm: float | None) -> float:
    """Clip to max_norm (if set) and return the total gradient norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return norm.item()


@torch.no_grad()
def _validate(state: TrainingState, logger: MetricsLogger) -> float:
    """Token-weighted validation loss over up to eval.max_batches micro-batches per rank."""
    model, env, step = state.model, state.env, state.step
    model.eval()
    totals = torch.zeros(2, device=env.device, dtype=torch.float64)  # (loss sum, target count)
    for batch in state.val_source.batches(state.config.eval.max_batches):
        batch = {k: v.to(env.device) for k, v in batch.items()}
        with state.autocast:
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

