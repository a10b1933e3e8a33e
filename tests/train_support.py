"""Shared settings of the training tests: tiny, fast runs from the example configs, and training in
separate processes.

Separate processes (for SIGKILL, crashes and multiple ranks) are forked from one forkserver that
has already imported torch, transformers and mptkit.train, so each costs a fork, not a ~5 s import.
They start from the same clean state, whatever the test process did before.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
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


def logged_losses(output_dir: Path) -> dict[int, float]:
    """step -> training loss from metrics.jsonl (the last row per step wins, as after a resume)."""
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def _context():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers", "mptkit.train.loop", "tests.train_support"])
    return context


def _main_in_child(argv: list[str], log_path: str, env: dict[str, str], threads: int, patch) -> None:
    import torch

    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.environ.update(env)
    torch.set_num_threads(threads)
    if patch is not None:
        patch()
    from mptkit.cli import main

    sys.exit(main(argv))


def start_mptkit(argv: list[str], log_path: Path, env: dict[str, str] | None = None, threads: int = 1,
                 patch=None) -> multiprocessing.Process:
    """Run `mptkit ARGV` in a child process writing its output to log_path; `patch` (a module-level
    function) runs in the child first."""
    process = _context().Process(target=_main_in_child, args=(argv, str(log_path), env or {}, threads, patch))
    process.start()
    return process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(argv: list[str], world_size: int, log_dir: Path, threads: int = 1) -> list[multiprocessing.Process]:
    """`mptkit ARGV` as `world_size` ranks: the environment torchrun gives each process."""
    port = free_port()
    return [
        start_mptkit(argv, log_dir / f"rank{rank}.log", threads=threads, env={
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        for rank in range(world_size)
    ]
