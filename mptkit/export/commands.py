"""`mptkit export SOURCE OUT_DIR`: a training checkpoint (or any model mptkit reads) in HF format."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .hf import EXPORT_DTYPES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mptkit export",
        description="Write a model as an HF-format directory (config.json, safetensors, the model's source "
                    "for trust_remote_code, tokenizer).",
    )
    parser.add_argument("source", help="a training checkpoint (step_* directory), a directory of them (its newest), "
                                       "or an HF-format model directory")
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", choices=EXPORT_DTYPES, default=EXPORT_DTYPES[0],
                        help="weight dtype to write (training keeps fp32 weights)")
    parser.add_argument("--no-tokenizer", action="store_true", help="do not save the tokenizer beside the model")
    return parser


def main(command: str, argv: list[str]) -> int:
    if command != "export":
        raise ValueError(f"mptkit.export.commands handles 'export', not {command!r}")
    args = _parser().parse_args(argv)
    from .hf import export_hf

    try:
        source = export_hf(args.source, args.out_dir, dtype=args.dtype, with_tokenizer=not args.no_tokenizer)
    except (ValueError, FileNotFoundError) as exc:
        print(f"mptkit export: {exc}", file=sys.stderr)
        return 2
    print(f"[mptkit export] {source.path} -> {Path(args.out_dir)}")
    return 0
