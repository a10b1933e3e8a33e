"""The typed configuration of a training run, loaded from YAML plus `key=value` overrides, and the
run it resolves to.

One `RunConfig` describes pretraining and fine-tuning alike. `load_run` reads it and resolves it
once into a `ResolvedRun`: the `model.init_from` source found on disk, the model config, the
sequence length, the LoRA base's identity. Every check is made there, the ones that need the model
too (seq_len against its max_seq_len, LoRA targets against its modules), so a run that would fail
later stops before anything is built, with the file, line, dotted key path and, for misspellings,
the closest known key. Nothing below reads the source's config or rebuilds the model config again.

The `model` section is a preset name (or `init_from`, a pretrained directory or training
checkpoint) plus any `MPTConfig` field as an override, e.g. `model.max_seq_len=4096` or
`model.attn_config.alibi_bias_max=16`.
"""

from __future__ import annotations

import dataclasses
import glob
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mptkit.adapters import DEFAULT_TARGET_MODULES, BaseIdentity, LoraSpec, base_identity, read_base_identity
from mptkit.data.shards import INDEX_FILE, read_index
from mptkit.loading import CHECKPOINTS_DIR, ModelSource, find_source, latest_checkpoint, read_run_config
from mptkit.model import MPTConfig
from mptkit.model.configuration_mpt import ConfigError as ModelConfigError
from mptkit.model.configuration_mpt import merge_config_fields

from . import typed_yaml
from .typed_yaml import ConfigError

# ---- sections -----------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    # A preset of mptkit.model.presets (tiny, mpt-125m, mpt-350m, mpt-1b, mpt-7b, ...).
    preset: str | None = "tiny"
    # Start from trained weights: an HF-format directory (config.json + weights), a training
    # checkpoint directory of `mptkit train`, or a Composer / llm-foundry checkpoint file (.pt).
    # Its model config replaces `preset`.
    init_from: str | None = None
    # Every other key of the section: MPTConfig fields applied on top (validated by MPTConfig).
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    kind: Literal["pretrain", "finetune"] = "pretrain"
    # pretrain: a shard directory made by `mptkit data`, or text files / globs that are tokenized
    #   into shards under `{output_dir}/data/` the first time.
    # finetune: JSONL files (instruct, chat or prompt/response records).
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    shuffle: bool = True
    # A tokenizer.json; null means the bundled GPT-NeoX tokenizer of MPT.
    tokenizer: str | None = None
    # finetune: record format (auto picks per row: chat "messages", or prompt/response and dolly rows).
    format: Literal["auto", "prompt_response", "chat"] = "auto"
    # finetune: train the last response of each example, or every assistant turn of a chat.
    train_on: Literal["last", "all"] = "last"
    # finetune: also train on the prompt tokens (MPT's recipe trains on responses only).
    train_on_prompt: bool = False
    # finetune: pack several examples per sequence (set model.attn_config.attn_uses_sequence_id
    # so that they do not attend to each other).
    packing: bool = False


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "lion"] = "adamw"
    lr: float = 6.0e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1.0e-8
    # Decoupled weight decay: each step multiplies weights by (1 - weight_decay * lr / peak_lr),
    # the convention of MosaicML's DecoupledAdamW / DecoupledLionW (independent of the lr scale).
    weight_decay: float = 0.0
    # Norm weights, biases and embeddings are not decayed unless asked.
    decay_norms_and_biases: bool = False
    decay_embeddings: bool = False


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    # cosine / linear decay from the peak lr to peak * final_lr_ratio at the last step.
    final_lr_ratio: float = 0.1


@dataclass
class TrainConfig:
    max_steps: int = 100
    # Sequences per optimizer step, over all ranks and accumulation steps.
    global_batch_size: int = 8
    # Sequences per forward pass on one rank; accumulation = global / (micro * world_size).
    micro_batch_size: int = 8
    # Shorter than the model's max_seq_len for cheap runs; null means model.max_seq_len.
    seq_len: int | None = None
    grad_clip_norm: float | None = 1.0
    precision: Literal["fp32", "bf16"] = "bf16"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    activation_checkpointing: bool = False
    # torch.compile each block (needs a C++ compiler on CPU, Triton on GPU).
    compile: bool = False


@dataclass
class ParallelConfig:
    # Under torchrun (WORLD_SIZE > 1) the model is sharded with FSDP2, one group per block.
    # true frees the gathered block weights after forward (least memory); false keeps them until
    # backward (less communication).
    reshard_after_forward: bool = True
    backend: Literal["auto", "gloo", "nccl"] = "auto"


@dataclass
class CheckpointConfig:
    # null: {output_dir}/checkpoints
    dir: str | None = None
    # Steps between checkpoints; 0 saves only at the end.
    interval: int = 100
    keep_last_n: int = 2
    # auto: continue from the newest complete checkpoint in `dir` if there is one;
    # never: start fresh; anything else: the path of a checkpoint to resume from.
    resume: str = "auto"


@dataclass
class EvalConfig:
    # Steps between validation passes; 0 evaluates only at the end (when data.val is set).
    interval: int = 0
    max_batches: int = 20
    micro_batch_size: int | None = None


@dataclass
class LoggingConfig:
    interval: int = 1
    progress_bar: bool = True
    jsonl: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "mptkit"
    loss_curve_png: bool = True
    # Peak FLOP/s for MFU; null measures a GEMM peak at start (CPU) or uses the GPU's datasheet.
    peak_tflops: float | None = None


@dataclass
class AnomalyConfig:
    # What a NaN/Inf loss or a loss spike does: stop the run (the last good checkpoint stays the
    # newest) or skip that update and continue.
    policy: Literal["stop", "skip"] = "stop"
    # A spike is a loss above spike_factor * (running mean of recent losses); 0 disables.
    spike_factor: float = 0.0
    # Steps of history needed before spikes are judged (early losses fall fast).
    spike_min_steps: int = 20
    # With policy skip: stop anyway after this many skipped steps in a row.
    max_consecutive_skips: int = 5


@dataclass
class RunConfig:
    name: str = "mptkit-run"
    output_dir: str = "out/run"
    seed: int = 17
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    # Set (even as `lora: {}`) to train LoRA adapters on a frozen base instead of every weight.
    lora: LoraSpec | None = None

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.output_dir) / CHECKPOINTS_DIR

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-ready dict (model overrides inlined, as in the file format)."""
        out = dataclasses.asdict(self, dict_factory=lambda items: {k: _yaml_ready(v) for k, v in items})
        model = out["model"]
        out["model"] = {"preset": model["preset"], "init_from": model["init_from"], **model["overrides"]}
        return out


def _yaml_ready(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value  # safe_dump writes lists, not tuples


@dataclass(frozen=True)
class ResolvedRun:
    """A run config worked out once, when read (`load_run`, `resolve`): what the layers below use."""

    config: RunConfig
    model_config: MPTConfig  # the preset's or the init_from model's, with the overrides merged
    seq_len: int  # train.seq_len, or the model's max_seq_len
    source: ModelSource | None = None  # model.init_from as found on disk (None: the preset, initialised)
    lora_base: BaseIdentity | None = None  # a LoRA run: the base its adapters belong to

    @property
    def lora(self) -> LoraSpec | None:
        return self.config.lora

    @property
    def compute_dtype(self) -> torch.dtype:
        """train.precision's dtype: autocast's, and a LoRA run's frozen base is held in it."""
        return torch.bfloat16 if self.config.train.precision == "bf16" else torch.float32

    @property
    def read_dtype(self) -> torch.dtype:
        """The dtype the starting weights are read in: fp32 for a full run (the optimizer's master
        weights); a LoRA base in its compute dtype, and a bf16 or int8 base in bf16, so that the
        whole base is never held in fp32 (7B: 27 GB) on its way to the compact form."""
        if self.lora is None:
            return torch.float32
        return torch.bfloat16 if self.lora.base_quantization in ("bf16", "int8") else self.compute_dtype


# ---- loading ------------------------------------------------------------------------------------


def load_run(path: str | Path | None, overrides: list[str] = ()) -> ResolvedRun:
    """Read a YAML file (or start from defaults), apply `a.b.c=value` overrides, resolve the run."""
    return resolve(*_read(path, overrides))


def read_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """The typed config of a file and overrides, each value checked but the run not resolved: for a
    caller that changes it in code before `resolve` (the demo starts from the shipped configs)."""
    return _read(path, overrides)[0]


def _read(path: str | Path | None, overrides: list[str]) -> tuple[RunConfig, typed_yaml.Origins]:
    return typed_yaml.load(RunConfig, path, overrides, readers={ModelConfig: _read_model_section},
                           override_example="optimizer.lr=3e-4")


def resolve(config: RunConfig, origins: typed_yaml.Origins | None = None) -> ResolvedRun:
    """The run `config` describes, with every check made (also for a config built or changed in code,
    e.g. by `dataclasses.replace`); `origins` (from reading a file) name where each key was set."""
    origins = origins or typed_yaml.Origins()
    _check_relations(config, origins)
    source = _init_source(_pinned_init_from(config), origins)
    if source is not None and source.reference != config.model.init_from and not Path(config.model.init_from).exists():
        # a hub name: the run records (and its checkpoints' run_config.yaml keeps) the commit it resolved to
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, init_from=source.reference))
    stored = _read_stored_fields(source, origins) if source is not None else None
    model_config = _model_config(config.model, stored, origins)
    seq_len = config.train.seq_len or model_config.max_seq_len
    if seq_len > model_config.max_seq_len:
        origins.fail("train.seq_len", f"{seq_len} exceeds the model's max_seq_len={model_config.max_seq_len}"
                     f"{f' ({source.path})' if source else ''}; set model.max_seq_len too (ALiBi extrapolates)")
    for split in ("train", "val"):
        _check_data(config.data, split, seq_len, origins)
    lora_base = None
    if config.lora is not None:
        of_model = f" (model of {source.path})" if source else ""
        for key, message in lora_problems(config.lora, model_config):
            origins.fail(key, message + of_model)
        lora_base = (source.identity(stored) if source is not None else
                     base_identity(None, {"preset": config.model.preset, "overrides": config.model.overrides,
                                          "seed": config.seed}))
    return ResolvedRun(config=config, model_config=model_config, seq_len=seq_len, source=source, lora_base=lora_base)


def _check_data(data: DataConfig, split: str, seq_len: int, origins: typed_yaml.Origins) -> None:
    """The files of data.train / data.val exist (URLs are read when the run starts), and a shard
    directory holds samples of the run's seq_len."""
    paths, key = getattr(data, split), f"data.{split}"
    if data.kind == "pretrain" and len(paths) == 1 and (Path(paths[0]) / INDEX_FILE).is_file():
        if (shard_len := read_index(paths[0]).seq_len) != seq_len:
            origins.fail(key, f"the shards in {paths[0]} hold samples of {shard_len} tokens but the run's seq_len is "
                         f"{seq_len}; set train.seq_len={shard_len} or prepare shards of the wanted length")
        return
    missing = [p for p in paths if not glob.glob(p) and "://" not in p]
    if missing:
        origins.fail(key, f"{missing[0]} does not exist (expected a shard directory from `mptkit data prepare`, or "
                     "text/JSONL/parquet files, directories or globs)")


def _pinned_init_from(config: RunConfig) -> str | None:
    """model.init_from, or, for a run resuming from its checkpoints, the pinned hub name (org/name@commit)
    its newest checkpoint records for the same name: a resumed run reads the commit it started from."""
    init_from = config.model.init_from
    newest = latest_checkpoint(config.checkpoint_dir) if init_from is not None else None
    if newest is not None:
        recorded = (read_run_config(newest).get("model") or {}).get("init_from")
        if isinstance(recorded, str) and recorded != init_from and recorded.partition("@")[0] == init_from:
            return recorded
    return init_from


def _init_source(init_from: str | None, origins: typed_yaml.Origins) -> ModelSource | None:
    """What model.init_from names (an HF-format directory, a training checkpoint or their directory,
    a Composer / llm-foundry checkpoint file)."""
    if init_from is None:
        return None
    try:
        source = find_source(init_from)
    except FileNotFoundError as exc:
        origins.fail("model.init_from", str(exc))
    if (base := source.lora_base_identity()) is not None:
        origins.fail("model.init_from", f"{source.path} is a LoRA run's checkpoint: it holds adapter weights only. "
                     f"Start from its base ({base.short()}), or merge the adapter into it first (mptkit export "
                     "BASE OUT --merge-lora ADAPTER)")
    return source


def _read_stored_fields(source: ModelSource, origins: typed_yaml.Origins) -> dict:
    try:
        return source.config_fields()
    except ValueError as exc:  # a missing or unreadable config file (CheckpointError)
        origins.fail("model.init_from", str(exc))


def _model_config(section: ModelConfig, stored: dict | None, origins: typed_yaml.Origins) -> MPTConfig:
    """The preset's config (or the init_from model's `stored` fields) with the section's overrides."""
    try:
        if stored is None:
            return MPTConfig.from_preset(section.preset, **section.overrides)
        return MPTConfig.from_dict(merge_config_fields(stored, section.overrides))
    except ModelConfigError as exc:
        origins.fail(typed_yaml.join("model", exc.field), exc.message)
    except (ValueError, TypeError) as exc:  # a value of a type MPTConfig's checks cannot compare
        origins.fail("model", str(exc))


def _model_config_fields() -> list[str]:
    from mptkit.model import MPTConfig

    params = inspect.signature(MPTConfig.__init__).parameters
    return [name for name, p in params.items() if name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]


def _read_model_section(value: Any, key: str, reader: typed_yaml.Reader) -> ModelConfig:
    """The `model:` section: preset or init_from, plus MPTConfig field names (their values are checked
    when `resolve` builds the MPTConfig)."""
    values = reader.mapping(value, key)
    preset = reader.coerce(values.get("preset", ModelConfig.preset), str | None, typed_yaml.join(key, "preset"))
    init_from = reader.coerce(values.get("init_from"), str | None, typed_yaml.join(key, "init_from"))
    if preset is None and init_from is None:
        reader.fail(typed_yaml.join(key, "preset"), "set a preset or init_from")
    if init_from is None:
        from mptkit.model.presets import PRESETS

        if preset not in PRESETS:
            reader.fail(typed_yaml.join(key, "preset"), f"unknown preset {preset!r}"
                        f"{typed_yaml.suggest(preset, PRESETS)}; choose one of {', '.join(PRESETS)}")
    overrides = {k: v for k, v in values.items() if k not in ("preset", "init_from")}
    fields = _model_config_fields()
    for name in overrides:
        if name not in fields:
            reader.fail(typed_yaml.join(key, name), f"not an MPTConfig field{typed_yaml.suggest(name, fields)}; "
                        f"known: preset, init_from, {', '.join(fields)}")
    return ModelConfig(preset=preset, init_from=init_from, overrides=overrides)


def _check_relations(config: RunConfig, origins: typed_yaml.Origins) -> None:
    """Checks that involve more than one field (the world size is checked when training starts)."""
    positive = {
        "train.max_steps": config.train.max_steps,
        "train.global_batch_size": config.train.global_batch_size,
        "train.micro_batch_size": config.train.micro_batch_size,
        "checkpoint.keep_last_n": config.checkpoint.keep_last_n,
        "eval.max_batches": config.eval.max_batches,
        "logging.interval": config.logging.interval,
        "optimizer.lr": config.optimizer.lr,
    }
    if config.train.seq_len is not None:
        positive["train.seq_len"] = config.train.seq_len
    for key, value in positive.items():
        if value <= 0:
            origins.fail(key, f"expected a positive value, got {value!r}")
    non_negative = {
        "schedule.warmup_steps": config.schedule.warmup_steps,
        "checkpoint.interval": config.checkpoint.interval,
        "eval.interval": config.eval.interval,
        "optimizer.weight_decay": config.optimizer.weight_decay,
        "anomaly.spike_factor": config.anomaly.spike_factor,
    }
    for key, value in non_negative.items():
        if value < 0:
            origins.fail(key, f"expected a value >= 0, got {value!r}")
    if config.train.global_batch_size % config.train.micro_batch_size:
        origins.fail("train.global_batch_size", f"{config.train.global_batch_size} is not a multiple of "
                     f"train.micro_batch_size={config.train.micro_batch_size}")
    if config.schedule.warmup_steps > config.train.max_steps:
        origins.fail("schedule.warmup_steps", f"{config.schedule.warmup_steps} exceeds train.max_steps="
                     f"{config.train.max_steps}")
    if not 0.0 <= config.schedule.final_lr_ratio <= 1.0:
        origins.fail("schedule.final_lr_ratio", f"expected a value in [0, 1], got {config.schedule.final_lr_ratio}")
    for i, beta in enumerate(config.optimizer.betas):
        if not 0.0 <= beta < 1.0:
            origins.fail("optimizer.betas", f"betas[{i}] must be in [0, 1), got {beta}")
    if config.train.grad_clip_norm is not None and config.train.grad_clip_norm <= 0:
        origins.fail("train.grad_clip_norm", "expected a positive number or null (no clipping)")
    if config.anomaly.spike_factor and config.anomaly.spike_factor <= 1.0:
        origins.fail("anomaly.spike_factor", f"expected 0 (off) or a factor > 1, got {config.anomaly.spike_factor}")
    if not config.data.train:
        origins.fail("data.train", "no training data: give a shard directory or files")
    if config.lora is not None:
        _check_lora(config, origins)


def _check_lora(config: RunConfig, origins: typed_yaml.Origins) -> None:
    lora = config.lora
    if lora.rank <= 0:
        origins.fail("lora.rank", f"expected a positive integer, got {lora.rank}")
    if lora.alpha <= 0:
        origins.fail("lora.alpha", f"expected a positive number, got {lora.alpha}")
    if not 0.0 <= lora.dropout < 1.0:
        origins.fail("lora.dropout", f"expected a value in [0, 1), got {lora.dropout}")
    if not lora.target_modules:
        origins.fail("lora.target_modules", "no modules to adapt; MPT's are " + ", ".join(DEFAULT_TARGET_MODULES))
    if lora.base_quantization == "nf4" and (config.train.device == "cpu" or not torch.cuda.is_available()):
        origins.fail("lora.base_quantization", "nf4 needs CUDA (bitsandbytes' 4-bit kernels); on CPU use int8")


def lora_problems(lora: LoraSpec, model_config: MPTConfig) -> list[tuple[str, str]]:
    """(key, why) for each module of the lora section that this model cannot have adapted or saved."""
    from mptkit.adapters import module_names, target_problem
    from mptkit.model import MPTForCausalLM

    with torch.device("meta"):
        model = MPTForCausalLM(model_config)
    problems = [("lora.target_modules", problem) for name in lora.target_modules
                if (problem := target_problem(model, name)) is not None]
    names = module_names(model)
    for name in lora.modules_to_save:
        if name not in names:
            problems.append(("lora.modules_to_save", f"no module of this model is called {name!r}"
                             f"{typed_yaml.suggest(name, names)}; its modules with weights are {', '.join(sorted(names))}"))
        elif name in lora.target_modules:
            problems.append(("lora.modules_to_save", f"{name} is also in lora.target_modules: a module is either "
                             "adapted or trained whole"))
    return problems
