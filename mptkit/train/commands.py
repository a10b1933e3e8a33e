"""`mptkit train CONFIG.yaml [key=value ...]` and `mptkit export CHECKPOINT OUT_DIR`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(command: str, argv: list[str]) -> int:
    if command == "train":
        return _train(argv)
    if command == "export":
        return _export(argv)
    raise ValueError(f"mptkit.train handles 'train' and 'export', not {command!r}")


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
    parser.add_argument("--print-config", action="store_true", help="print the validated config and exit")
    args = parser.parse_args(argv)

    import yaml

    from .config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"mptkit train: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0

    from .loop import TrainingHalted, train

    try:
        result = train(config)
    except ConfigError as exc:
        print(f"mptkit train: {exc}", file=sys.stderr)
        return 2
    except TrainingHalted as exc:
        print(f"mptkit train: {exc}", file=sys.stderr)
        return 3
    if result.checkpoint is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"[mptkit train] done at step {result.step}; checkpoint {result.checkpoint}")
    return 0


def _export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mptkit export",
        description="Write a training checkpoint as an HF-format model directory (config.json, safetensors, "
                    "the model's source for trust_remote_code, tokenizer).",
    )
    parser.add_argument("checkpoint", help="a checkpoint (step_* directory) or a checkpoint directory (its newest)")
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weight dtype to write (training keeps fp32 weights)")
    parser.add_argument("--no-tokenizer", action="store_true", help="do not save the tokenizer beside the model")
    args = parser.parse_args(argv)

    from .export import export_checkpoint

    try:
        source = export_checkpoint(args.checkpoint, args.out_dir, dtype=args.dtype,
                                   with_tokenizer=not args.no_tokenizer)
    except FileNotFoundError as exc:
        print(f"mptkit export: {exc}", file=sys.stderr)
        return 2
    print(f"[mptkit export] {source} -> {Path(args.out_dir)}")
    return 0
