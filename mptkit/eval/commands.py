"""`mptkit eval perplexity | extrapolate | multiple-choice | harness-task`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mptkit.data.sources import DEFAULT_TEXT_FIELD, read_texts
from mptkit.eval.defaults import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BATCH_TOKENS,
    DEFAULT_MULTIPLES,
    DEFAULT_STRIDE_RATIO,
    PRECISIONS,
)


def main(command: str, argv: list[str]) -> int:
    if command != "eval":
        raise ValueError(f"mptkit.eval.commands handles 'eval', not {command!r}")
    parser = _parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"mptkit eval {argv[0]}: {e}", file=sys.stderr)
        return 2


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a model: an HF-format directory, a training checkpoint (or their directory), a Composer / llm-foundry checkpoint file, or a hub name org/name[@revision] (downloaded into the hub cache)")
    parser.add_argument("--revision", help="of a hub name: a branch, tag or commit (default: main)")
    parser.add_argument("--tokenizer", help="tokenizer file or directory (default: the model's, else GPT-NeoX-20B)")
    parser.add_argument("--precision", choices=PRECISIONS, default=PRECISIONS[0],
                        help="bf16: matmuls under bf16 autocast")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--adapter", metavar="DIR", help="a LoRA adapter (PEFT format, or a hub name) merged into the model")


def _data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="+", help="text files (one document each), JSONL, directories or globs")
    parser.add_argument("--text-field", default=DEFAULT_TEXT_FIELD,
                        help=f"JSONL field holding the text (default: {DEFAULT_TEXT_FIELD})")
    parser.add_argument("--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS,
                        help="input tokens per forward pass (more helps on GPUs)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mptkit eval", description="Evaluate a causal LM.")
    sub = parser.add_subparsers(dest="subcommand", required=True)

    ppl = sub.add_parser("perplexity", help="nonoverlapping or sliding-window perplexity")
    _common(ppl)
    _data(ppl)
    ppl.add_argument("--seq-len", type=int, required=True, help="window length in tokens")
    ppl.add_argument("--stride", type=int, help="sliding-window stride (default: seq-len, nonoverlapping)")
    ppl.add_argument("--json", type=Path, help="also write the result as JSON here")
    ppl.set_defaults(run=_perplexity)

    ext = sub.add_parser("extrapolate", help="perplexity at 1x..16x the training length: table + PNG")
    _common(ext)
    _data(ext)
    ext.add_argument("--train-len", type=int, required=True, help="the length the model was trained at")
    ext.add_argument("--multiples", default=",".join(map(str, DEFAULT_MULTIPLES)), help="eval lengths as multiples of train-len")
    ext.add_argument(
        "--stride-ratio", type=float, default=DEFAULT_STRIDE_RATIO, help="sliding stride as a fraction of the eval length"
    )
    ext.add_argument("--no-sliding", action="store_true", help="nonoverlapping evaluation only")
    ext.add_argument("--out", type=Path, default=Path("out/extrapolation"), help="folder for the table, JSON and PNG")
    ext.set_defaults(run=_extrapolate)

    mc = sub.add_parser("multiple-choice", help="accuracy on a JSONL of {context, choices, label}")
    _common(mc)
    mc.add_argument("data", type=Path, help="JSONL file, one {context, choices, label} per line")
    mc.add_argument("--max-len", type=int, help="cut inputs from the left to this many tokens")
    mc.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    mc.add_argument("--predictions", type=Path, help="write per-example scores as JSONL here")
    mc.set_defaults(run=_multiple_choice)

    task = sub.add_parser("harness-task", help="write an lm-evaluation-harness task YAML for a multiple-choice JSONL")
    task.add_argument("data", type=Path, help="JSONL file, one {context, choices, label} per line")
    task.add_argument("--name", required=True, help="task name (letters, digits, underscores)")
    task.add_argument("--out", type=Path, required=True, help="folder to pass to lm_eval --include_path")
    task.set_defaults(run=_harness_task)
    return parser


def _load(args, max_seq_len: int | None = None):
    from mptkit.eval.perplexity import autocast_dtype
    from mptkit.loading import load

    loaded = load(args.model, dtype="float32", tokenizer=args.tokenizer, max_seq_len=max_seq_len, adapter=args.adapter,
                  revision=args.revision)
    return loaded.model, loaded.tokenizer, autocast_dtype(args.precision)


def _documents(args, tokenizer) -> list[list[int]]:
    from mptkit.eval.perplexity import tokenize_documents

    return tokenize_documents(tokenizer, read_texts(args.data, args.text_field))


def _perplexity(args) -> int:
    from mptkit.eval.perplexity import evaluate_perplexity

    model, tokenizer, dtype = _load(args, max_seq_len=args.seq_len)
    documents = _documents(args, tokenizer)
    result = evaluate_perplexity(
        model, documents, args.seq_len, args.stride, batch_tokens=args.batch_tokens,
        autocast_dtype=dtype, progress=not args.quiet,
    )
    print(
        f"{result.mode} perplexity @ {result.seq_len} tokens (stride {result.stride}): {result.perplexity:.4f}  "
        f"[{result.num_tokens} tokens scored in {len(documents)} documents, {result.num_windows} windows, "
        f"mean NLL {result.mean_nll:.5f} nats]"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": str(args.model), "documents": len(documents), **result.to_dict()}, indent=2))
    return 0


def _extrapolate(args) -> int:
    from mptkit.eval.extrapolation import markdown_table, plot_curves, sweep, sweep_columns

    multiples = [int(m) for m in args.multiples.split(",")]
    lengths = [args.train_len * m for m in multiples]
    model, tokenizer, dtype = _load(args, max_seq_len=max(lengths))
    documents = _documents(args, tokenizer)
    points = sweep(
        model, documents, lengths, stride_ratio=None if args.no_sliding else args.stride_ratio,
        batch_tokens=args.batch_tokens, autocast_dtype=dtype, progress=not args.quiet,
    )
    columns = sweep_columns(points)
    table = markdown_table(lengths, columns)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_curves(lengths, columns, args.train_len, args.out / "extrapolation.png", f"{Path(args.model).name}: perplexity vs length")
    scored = points[0].nonoverlapping.num_tokens
    note = (
        f"Perplexity of {args.model} trained at {args.train_len} tokens; {scored} tokens of {len(documents)} "
        f"documents scored at every length"
        + ("" if args.no_sliding else f"; sliding stride = {args.stride_ratio:g} x eval length")
        + f"; precision {args.precision}."
    )
    (args.out / "extrapolation.md").write_text(f"{note}\n\n{table}\n")
    rows = [
        {"seq_len": p.seq_len, "nonoverlapping": p.nonoverlapping.to_dict(), "sliding": p.sliding and p.sliding.to_dict()}
        for p in points
    ]
    (args.out / "extrapolation.json").write_text(json.dumps({"model": str(args.model), "train_len": args.train_len, "points": rows}, indent=2))
    print(f"{note}\n\n{table}\n\nwrote {args.out}/extrapolation.{{md,json,png}}")
    return 0


def _multiple_choice(args) -> int:
    from mptkit.eval.multiple_choice import evaluate_multiple_choice, read_examples

    examples = read_examples(args.data)
    model, tokenizer, dtype = _load(args)
    result = evaluate_multiple_choice(
        model, tokenizer, examples, max_len=args.max_len, batch_size=args.batch_size,
        autocast_dtype=dtype, progress=not args.quiet,
    )
    print(f"{args.data}: {result.num_examples} examples  acc {result.acc:.4f}  acc_norm {result.acc_norm:.4f}")
    if args.predictions:
        args.predictions.parent.mkdir(parents=True, exist_ok=True)
        args.predictions.write_text("".join(json.dumps(p) + "\n" for p in result.predictions))
    return 0


def _harness_task(args) -> int:
    from mptkit.eval.multiple_choice import harness_task_yaml, read_examples

    examples = read_examples(args.data)  # validate before handing it to the harness
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name}.yaml"
    path.write_text(harness_task_yaml(args.data, args.name))
    print(f"wrote {path} ({len(examples)} examples); run:\n  lm_eval --model hf --model_args "
          f"pretrained=MODEL_DIR,trust_remote_code=True,dtype=float32 --tasks {args.name} "
          f"--include_path {args.out} --device cpu --batch_size 8")
    return 0
