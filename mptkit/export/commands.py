"""`mptkit export SOURCE OUT`: a training checkpoint (or any model mptkit reads) in HF format, or as a
GGUF file for llama.cpp (`--format gguf`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mptkit.files import DiskFullError

from .defaults import DEFAULT_OUTTYPE, EXPORT_DTYPES, OUTTYPES

FORMATS = ("hf", "gguf")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mptkit export",
        description="Write a model as an HF-format directory (config.json, safetensors, the model's source "
                    "for trust_remote_code, tokenizer) or, with --format gguf, as one GGUF file for llama.cpp "
                    "(and Ollama, LM Studio).",
    )
    parser.add_argument("source", help="a model: an HF-format directory, a training checkpoint (or their directory), a Composer / llm-foundry checkpoint file, or a hub name org/name[@revision] (downloaded into the hub cache)")
    parser.add_argument("--revision", help="of a hub name: a branch, tag or commit (default: main)")
    parser.add_argument("out", help="hf: the output directory; gguf: the .gguf file, or a directory "
                                    "(model-<outtype>.gguf inside)")
    parser.add_argument("--format", choices=FORMATS, default="hf", help="what to write (default: hf)")
    parser.add_argument("--dtype", choices=EXPORT_DTYPES, default=None,
                        help=f"hf: weight dtype to write (default {EXPORT_DTYPES[0]}; training keeps fp32 weights)")
    parser.add_argument("--outtype", choices=OUTTYPES, default=None,
                        help=f"gguf: weight type of the matrices (default {DEFAULT_OUTTYPE}; 1-D tensors stay f32, "
                             "as llama.cpp's converter keeps them)")
    parser.add_argument("--no-tokenizer", action="store_true",
                        help="hf: do not save the tokenizer beside the model (a GGUF file always carries it)")
    parser.add_argument("--merge-lora", metavar="ADAPTER_DIR",
                        help="hf: merge this LoRA adapter (PEFT format) into SOURCE, its base, and write the result "
                             "as a plain checkpoint")
    return parser


def _check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.format == "gguf" and (args.dtype is not None or args.no_tokenizer):
        parser.error("--dtype and --no-tokenizer are for --format hf; a GGUF export takes --outtype")
    if args.format == "hf" and args.outtype is not None:
        parser.error("--outtype is for --format gguf; an HF export takes --dtype")
    if args.format == "gguf" and args.merge_lora is not None:
        parser.error("--merge-lora writes an HF checkpoint; export that one with --format gguf")


def main(command: str, argv: list[str]) -> int:
    if command != "export":
        raise ValueError(f"mptkit.export.commands handles 'export', not {command!r}")
    parser = _parser()
    args = parser.parse_args(argv)
    _check_options(parser, args)
    try:
        if args.format == "gguf":
            from .gguf import export_gguf

            source, written = export_gguf(args.source, args.out, outtype=args.outtype or DEFAULT_OUTTYPE,
                                          revision=args.revision)
        else:
            from .hf import export_hf

            source = export_hf(args.source, args.out, dtype=args.dtype or EXPORT_DTYPES[0],
                               with_tokenizer=not args.no_tokenizer, adapter=args.merge_lora, revision=args.revision)
            written = Path(args.out)
    except (ValueError, FileNotFoundError, ImportError, DiskFullError) as exc:
        print(f"mptkit export: {exc}", file=sys.stderr)
        return 2
    print(f"[mptkit export] {source.reference} -> {written}")
    return 0
