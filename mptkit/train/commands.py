"""`mptkit train CONFIG.yaml [key=value ...]`."""

from __future__ import annotations

import argparse
import os
import sys


def main(command: str, argv: list[str]) -> int:
    if command == "train":
        return _train(argv)
    raise ValueError(f"mptkit.train handles 'train', not {command!r}")


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mptkit train",
        description="Pretrain or fine-tune an MPT model. Run under `torchrun --nproc_per_node=N` to shard it "
                    "with FSDP2 over N processes (GPUs, or CPU processes with gloo).",
        epilog="Overrides use dotted keys: optimizer.lr=3e-4 train.max_steps=200 model.max_seq_len=4096 "
               "checkpoint.resume=never. See docs/training.md for every key.",
    )
    parser.add_argument("config", help="YAML file (configs/pretrain/*.yaml, configs/finetune/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--print-config", action="store_true", help="print the validated config (every check of a run made) and exit")
    args = parser.parse_intermixed_args(argv)  # options may come between or after the overrides

    import yaml

    from .config import ConfigError, load_run

    try:
        run = load_run(args.config, args.overrides)
    except ConfigError as exc:
        print(f"mptkit train: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(run.config.to_dict(), sort_keys=False), end="")
        return 0

    from mptkit.files import DiskFullError

    from .loop import TrainingHalted, train

    try:
        result = train(run)
    except ConfigError as exc:
        print(f"mptkit train: {exc}", file=sys.stderr)
        return 2
    except DiskFullError as exc:  # the checkpoints before it are kept: resume once there is room
        print(f"mptkit train: {exc}", file=sys.stderr)
        return 1
    except TrainingHalted as exc:
        print(f"mptkit train: {exc}", file=sys.stderr)
        return 3
    if result.checkpoint is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"[mptkit train] done at step {result.step}; checkpoint {result.checkpoint}")
    return 0

