"""What a checkpoint records of the training that made it: the run's config (run_config.yaml beside a
training checkpoint), its metrics (the run's metrics.jsonl) or a Composer checkpoint's counters,
read into one typed record for model cards. Read leniently: a field a record lacks stays None, as
in checkpoints written by older versions; nothing here decides how a model is built."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .checkpoints import read_run_config
from .sources import ModelSource

METRICS_FILE = "metrics.jsonl"  # in the run's output_dir, written by mptkit.train.metrics


@dataclass(frozen=True)
class Evaluation:
    step: int
    loss: float  # mean cross-entropy per token on the validation data, nats
    tokens: int | None


@dataclass(frozen=True)
class TrainingRecord:
    step: int | None = None  # optimizer steps that made the weights
    tokens: int | None = None  # tokens trained on up to `step`
    run_name: str | None = None
    kind: str | None = None  # "pretrain" or "finetune"
    train_data: tuple[str, ...] = ()
    val_data: tuple[str, ...] = ()
    max_steps: int | None = None
    global_batch_size: int | None = None
    seq_len: int | None = None
    precision: str | None = None
    optimizer: str | None = None  # e.g. "adamw, lr 0.003, cosine schedule with 20 warmup steps"
    init_from: str | None = None  # the model training started from
    lora_rank: int | None = None  # set when the run trained LoRA adapters
    evaluation: Evaluation | None = None  # the last validation at or before `step`


def read_metrics(jsonl_path: Path) -> list[dict]:
    """Rows of a metrics file, the last training row and validation row per step kept (a resumed
    run logs again the steps after its checkpoint)."""
    rows: dict[tuple[int, bool], dict] = {}
    for line in Path(jsonl_path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[(row["step"], "val_loss" in row)] = row
    return [rows[key] for key in sorted(rows)]


def _section(config: dict, name: str) -> dict:
    value = config.get(name)
    return value if isinstance(value, dict) else {}


def _metrics_file(checkpoint: Path, output_dir: str | None) -> Path | None:
    """The run's metrics.jsonl: in its output_dir as recorded (relative to where the run started,
    so also tried as the checkpoint directory's grandparent: output_dir/checkpoints/step_*)."""
    candidates = [checkpoint.parent.parent / METRICS_FILE, checkpoint.parent / METRICS_FILE]
    if output_dir and Path(output_dir).is_absolute():
        candidates.insert(0, Path(output_dir) / METRICS_FILE)
    return next((path for path in candidates if path.is_file()), None)


def _from_metrics(path: Path | None, step: int | None) -> tuple[int | None, Evaluation | None]:
    if path is None or step is None:
        return None, None
    try:
        rows = [row for row in read_metrics(path) if row["step"] <= step]
    except (json.JSONDecodeError, KeyError, TypeError, OSError):
        return None, None  # a damaged log costs the card its numbers, not the export
    tokens = next((row["tokens_seen"] for row in reversed(rows) if "tokens_seen" in row), None)
    val = next((row for row in reversed(rows) if "val_loss" in row), None)
    evaluation = Evaluation(val["step"], float(val["val_loss"]), val.get("val_tokens")) if val else None
    return tokens, evaluation


def _optimizer_summary(optimizer: dict, schedule: dict) -> str | None:
    if not optimizer.get("name"):
        return None
    text = f"{optimizer['name']}, lr {optimizer.get('lr')}"
    if schedule.get("name"):
        text += f", {schedule['name']} schedule"
        if schedule.get("warmup_steps"):
            text += f" with {schedule['warmup_steps']} warmup steps"
    return text


def read_run_record(source: ModelSource) -> TrainingRecord:
    """A training checkpoint's record: its run_config.yaml and the run's metrics up to its step."""
    config = read_run_config(source.path)
    data, train, model = _section(config, "data"), _section(config, "train"), _section(config, "model")
    lora = config.get("lora")
    tokens, evaluation = _from_metrics(_metrics_file(source.path, config.get("output_dir")), source.step)
    return TrainingRecord(
        step=source.step,
        tokens=tokens,
        run_name=config.get("name"),
        kind=data.get("kind"),
        train_data=tuple(str(item) for item in data.get("train") or ()),
        val_data=tuple(str(item) for item in data.get("val") or ()),
        max_steps=train.get("max_steps"),
        global_batch_size=train.get("global_batch_size"),
        seq_len=train.get("seq_len"),
        precision=train.get("precision"),
        optimizer=_optimizer_summary(_section(config, "optimizer"), _section(config, "schedule")),
        init_from=model.get("init_from"),
        lora_rank=lora.get("rank") if isinstance(lora, dict) else None,
        evaluation=evaluation,
    )
