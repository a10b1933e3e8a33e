"""Train short, test long: ALiBi against learned and rotary positions (the ALiBi paper's study).

Tiny MPTs identical in size, data, token budget and seed, differing only in the position scheme,
are pretrained with `mptkit.train` at 128 tokens on the bundled books (data/books/train; The Great
Gatsby and Alice are held out), exported to HF format, and evaluated with `mptkit.eval` on the two
held-out books at 128 .. 2048 tokens, nonoverlapping and sliding (stride = 1/4 of the window).

    .venv/bin/python benchmarks/extrapolation.py --steps 800          # the issue's reference scale
    .venv/bin/python benchmarks/extrapolation.py --steps 20 --d-model 64 --n-layers 2 --eval-tokens 4096  # smoke

Writes out/extrapolation/{table.md, nonoverlapping.png, sliding.png} and out/extrapolation/<scheme>/
{result.json, model/, loss_curve.png}. Schemes can run as parallel processes (--schemes rope, ...);
the table is written once all three results exist (or with --table-only).
The learned-position model gets a 2048-row table so that it can be run past 128 at all: rows
128..2047 are never trained, which is what learned positions mean for extrapolation.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mptkit.data.prepare import prepare_pretraining  # noqa: E402
from mptkit.eval.extrapolation import markdown_table, plot_curves, sweep  # noqa: E402
from mptkit.data.tokenizer import load_tokenizer  # noqa: E402
from mptkit.data.sources import read_texts  # noqa: E402
from mptkit.eval.perplexity import tokenize_documents  # noqa: E402
from mptkit.train.config import load_run  # noqa: E402
from mptkit.export.hf import export_hf  # noqa: E402
from mptkit.loading import load_model  # noqa: E402
from mptkit.train.loop import train  # noqa: E402

# MPTConfig overrides of each scheme; everything else is shared.
SCHEMES = {
    "alibi": ["model.attn_config.alibi=true"],
    "learned": ["model.attn_config.alibi=false", "model.learned_pos_emb=true"],
    "rope": ["model.attn_config.alibi=false", "model.attn_config.rope=true"],
}
LABELS = {"alibi": "ALiBi", "learned": "learned", "rope": "RoPE"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schemes", default="alibi,learned,rope")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--train-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="training and evaluation")
    p.add_argument("--multiples", default="1,2,4,8,16", help="eval lengths as multiples of --train-len")
    p.add_argument("--eval-tokens", type=int, default=0, help="first N tokens of each held-out book (0: all)")
    p.add_argument("--stride-ratio", type=float, default=0.25, help="sliding stride / window")
    p.add_argument("--seed", type=int, default=17)
    p.add_argument("--out", type=Path, default=REPO / "out" / "extrapolation")
    p.add_argument("--reuse", action="store_true", help="evaluate already trained models in --out")
    p.add_argument("--table-only", action="store_true", help="assemble table.md and plots from the result.json files")
    return p.parse_args(argv)


def train_scheme(args, scheme: str, shards: Path) -> dict:
    run_dir = args.out / scheme
    if run_dir.exists():
        shutil.rmtree(run_dir)
    overrides = [
        f"name=extrapolation-{scheme}",
        f"output_dir={run_dir}",
        f"seed={args.seed}",
        "model.preset=tiny",
        f"model.d_model={args.d_model}",
        f"model.n_heads={args.n_heads}",
        f"model.n_layers={args.n_layers}",
        # the learned table must exist up to the longest eval length; ALiBi and RoPE ignore it
        f"model.max_seq_len={args.train_len * max(int(m) for m in args.multiples.split(','))}",
        *SCHEMES[scheme],
        f"data.train=[{shards}]",
        "data.val=[]",
        "optimizer.name=adamw",
        f"optimizer.lr={args.lr}",
        "optimizer.weight_decay=0.0",
        "schedule.name=cosine",
        f"schedule.warmup_steps={max(1, args.steps // 20)}",
        "schedule.final_lr_ratio=0.1",
        f"train.max_steps={args.steps}",
        f"train.global_batch_size={args.batch}",
        f"train.micro_batch_size={args.batch}",
        f"train.seq_len={args.train_len}",
        f"train.precision={args.precision}",
        "train.device=cpu",
        "checkpoint.interval=0",
        "checkpoint.keep_last_n=1",
        "checkpoint.resume=never",
        f"logging.interval={max(1, args.steps // 50)}",
        "logging.tensorboard=false",
    ]
    run = load_run(None, overrides)
    started = time.perf_counter()
    result = train(run)
    seconds = time.perf_counter() - started
    export_hf(result.checkpoint, run_dir / "model")
    last = sorted(result.losses)[-10:]
    return {
        "train_seconds": seconds,
        "seconds_per_step": seconds / args.steps,
        "final_train_loss": sum(result.losses[s] for s in last) / len(last),
    }


def evaluate_scheme(args, scheme: str, documents, lengths, autocast) -> dict:
    model, _ = load_model(args.out / scheme / "model", max_seq_len=max(lengths))
    started = time.perf_counter()
    points = sweep(model, documents, lengths, stride_ratio=args.stride_ratio, autocast_dtype=autocast,
                   label=f"{scheme} ")
    return {
        "eval_seconds": time.perf_counter() - started,
        "train_len": args.train_len,
        "stride_ratio": args.stride_ratio,
        "lengths": lengths,
        "nonoverlapping": [p.nonoverlapping.perplexity for p in points],
        "sliding": [p.sliding.perplexity for p in points],
        "tokens_scored": points[0].nonoverlapping.num_tokens,
    }


def write_table(args, schemes: list[str]) -> str:
    """Assemble the table and plots from each scheme's result.json (schemes may run in parallel).
    Lengths, training length and stride are those the results were measured at, whatever the flags
    say now (a result.json written before they were recorded falls back to the flags)."""
    results = {}
    for scheme in schemes:
        path = args.out / scheme / "result.json"
        if not path.is_file():
            raise SystemExit(f"{path}: missing; run `benchmarks/extrapolation.py --schemes {scheme}` first")
        results[scheme] = json.loads(path.read_text())
    def measured(result: dict) -> dict:
        return {key: result.get(key, getattr(args, key, None)) for key in ("train_len", "stride_ratio", "lengths")}

    first = results[schemes[0]]
    settings = measured(first)
    for scheme in schemes[1:]:
        if measured(results[scheme]) != settings:
            raise SystemExit(f"{args.out / scheme / 'result.json'}: measured with {measured(results[scheme])}, "
                             f"{schemes[0]} with {settings}: re-run one of them with the other's settings")
    lengths, train_len, stride_ratio = settings["lengths"], settings["train_len"], settings["stride_ratio"]
    lines = [f"Trained at {train_len} tokens; perplexity on {first['tokens_scored']} held-out tokens "
             f"(data/books/heldout: Gatsby and Alice)."]
    lines.append("\n| scheme | train s/step | final train loss | eval s |\n|---|---:|---:|---:|")
    for s in schemes:
        r = results[s]
        lines.append(f"| {LABELS[s]} | {r['seconds_per_step']:.2f} | {r['final_train_loss']:.3f} | {r['eval_seconds']:.0f} |")
    sections = ["\n".join(lines)]
    for mode in ("nonoverlapping", "sliding"):
        columns = {LABELS[s]: results[s][mode] for s in schemes}
        title = f"### {mode}" + (f" (stride = {stride_ratio:g} x eval length)" if mode == "sliding" else "")
        sections.append(title + "\n\n" + markdown_table(lengths, columns))
        plot_curves(lengths, columns, train_len, args.out / f"{mode}.png",
                    f"held-out books, {mode}: trained at {train_len}")
    table = "\n\n".join(sections)
    (args.out / "table.md").write_text(table + "\n")
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    schemes = args.schemes.split(",")
    lengths = [args.train_len * int(m) for m in args.multiples.split(",")]
    autocast = torch.bfloat16 if args.precision == "bf16" else None
    if args.table_only:
        print(write_table(args, schemes))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"torch threads {torch.get_num_threads()}; schemes {schemes}; eval lengths {lengths}", flush=True)

    shards = args.out / "data" / f"books-train-seq{args.train_len}"
    shards.parent.mkdir(parents=True, exist_ok=True)
    with open(shards.parent / f"{shards.name}.lock", "w") as lock:  # schemes run as parallel processes
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shards / "index.json").is_file():
            prepare_pretraining([str(REPO / "data/books/train")], shards, seq_len=args.train_len)
    tokenizer = load_tokenizer()
    books = sorted((REPO / "data/books/heldout").glob("*.txt*"))
    documents = tokenize_documents(tokenizer, read_texts(books))
    if args.eval_tokens:
        documents = [d[: args.eval_tokens] for d in documents]
    print(f"held-out: {[b.name for b in books]}, {sum(len(d) - 1 for d in documents)} tokens scored at every length",
          flush=True)

    for scheme in schemes:
        result_file = args.out / scheme / "result.json"
        entry = json.loads(result_file.read_text()) if args.reuse else train_scheme(args, scheme, shards)
        print(f"[{scheme}] trained {args.steps} steps in {entry['train_seconds']:.0f} s "
              f"({entry['seconds_per_step']:.2f} s/step), final train loss {entry['final_train_loss']:.3f}", flush=True)
        entry.update(evaluate_scheme(args, scheme, documents, lengths, autocast))
        print(f"[{scheme}] nonoverlapping {['%.1f' % v for v in entry['nonoverlapping']]}, "
              f"sliding {['%.1f' % v for v in entry['sliding']]} ({entry['eval_seconds']:.0f} s)", flush=True)
        result_file.write_text(json.dumps(entry, indent=2))
    if all((args.out / s / "result.json").is_file() for s in SCHEMES):
        print("\n" + write_table(args, list(SCHEMES)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
