"""Shared settings of the training tests: tiny, fast runs from the example configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_YAML = REPO / "configs/pretrain/tiny.yaml"
INSTRUCT_YAML = REPO / "configs/finetune/instruct.yaml"
ONE_BOOK = "data/books/train/pg16.txt.gz"  # Peter Pan: ~68k tokens, tokenized in well under a second


def pretrain_overrides(output_dir: Path, steps: int, **extra) -> list[str]:
    """The tiny example config cut down to seconds: one book, 64-token samples, batch 4."""
    settings = {
        "output_dir": str(output_dir),
        "data.train": f"[{REPO / ONE_BOOK}]",
        "data.val": "[]",
        "train.max_steps": steps,
        "train.seq_len": 64,
        "train.global_batch_size": 4,
        "train.micro_batch_size": 4,
        "schedule.warmup_steps": 2,
        "checkpoint.interval": 0,
        "logging.interval": 1,
        "logging.progress_bar": "false",
        "logging.tensorboard": "false",
        "logging.loss_curve_png": "false",
        "logging.peak_tflops": 1.0,  # skip the GEMM measurement
    }
    settings.update(extra)
    return [f"{key}={value}" for key, value in settings.items()]


def run_cli(args: list[str], env_extra: dict | None = None, **kwargs) -> subprocess.Popen:
    """Start `mptkit ARGS` in a fresh interpreter (the SIGKILL and multi-process tests need one)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "mptkit.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def logged_losses(output_dir: Path) -> dict[int, float]:
    """step -> training loss from metrics.jsonl (the last row per step wins, as after a resume)."""
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}
