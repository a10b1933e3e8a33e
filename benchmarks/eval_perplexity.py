"""Perplexity evaluation: mptkit.eval against the usual transformers recipe, same weights, same process.

The competitor is transformers' own `MptForCausalLM` (an independent implementation of the model)
driven the way the transformers perplexity guide does it: one window at a time, labels masked to
-100 outside the newly scored tokens, `model(input_ids, labels=...).loss` times the number of scored
tokens. Both sides use the same windows (L inputs predicting the next token; sliding windows score
their `stride` newest predictions), so their totals must agree; the script prints both perplexities,
the token counts and the time ratio.

    .venv/bin/python benchmarks/eval_perplexity.py                       # out/demo/base-model if present
    .venv/bin/python benchmarks/eval_perplexity.py --model DIR --seq-len 512 --stride 128 --tokens 8192
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mptkit.data.tokenizer import load_tokenizer  # noqa: E402
from mptkit.data.sources import read_texts  # noqa: E402
from mptkit.loading import load_model  # noqa: E402
from mptkit.eval.perplexity import evaluate_perplexity, plan_windows, tokenize_documents  # noqa: E402
from mptkit.model import MPTConfig, MPTForCausalLM  # noqa: E402


@torch.no_grad()
def transformers_recipe(model, documents, seq_len: int, stride: int) -> tuple[float, int]:
    """Summed NLL and token count, one window per forward pass, loss from masked labels."""
    nll, count = 0.0, 0
    for ids in documents:
        ids = torch.tensor(ids)
        for w in plan_windows(len(ids), seq_len, stride):
            # the guide feeds inputs and targets as one sequence; the model shifts the labels
            window = ids[w.start : w.start + w.length + 1][None]
            labels = window.clone()
            labels[:, : window.shape[1] - w.num_scored] = -100  # only the newest predictions count
            nll += model(window, labels=labels).loss.item() * w.num_scored
            count += w.num_scored
    return nll, count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=REPO / "out/demo/base-model")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--stride", type=int, default=128)
    p.add_argument("--tokens", type=int, default=4096, help="first N tokens of each held-out book")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model
        if not (model_dir / "config.json").is_file():  # no demo run yet: a random ALiBi MPT of the demo's shape
            model_dir = Path(scratch) / "model"
            torch.manual_seed(0)
            MPTForCausalLM(MPTConfig.from_preset("tiny", d_model=128, n_layers=4, max_seq_len=512)).save_pretrained(model_dir)
        compare(model_dir, args)
    return 0


def compare(model_dir: Path, args) -> None:
    """mptkit's perplexity and the transformers guide's recipe on the same checkpoint, timed."""
    ours, _ = load_model(model_dir, max_seq_len=args.seq_len)
    from transformers import MptForCausalLM

    theirs = MptForCausalLM.from_pretrained(model_dir, max_seq_len=args.seq_len + 1).eval()
    documents = [d[: args.tokens] for d in tokenize_documents(load_tokenizer(), read_texts([REPO / "data/books/heldout"]))]
    print(f"model {model_dir}, {sum(len(d) - 1 for d in documents)} tokens, seq_len {args.seq_len}, stride {args.stride}, "
          f"{torch.get_num_threads()} threads, fp32")
    for stride in sorted({args.seq_len, args.stride}, reverse=True):
        started = time.perf_counter()
        result = evaluate_perplexity(ours, documents, args.seq_len, stride, progress=False)
        ours_s = time.perf_counter() - started
        started = time.perf_counter()
        nll, count = transformers_recipe(theirs, documents, args.seq_len, stride)
        theirs_s = time.perf_counter() - started
        mode = "nonoverlapping" if stride == args.seq_len else f"sliding/{stride}"
        print(f"{mode:>16}: mptkit ppl {result.perplexity:.4f} ({result.num_tokens} tok, {ours_s:.1f} s) | "
              f"transformers recipe ppl {math.exp(nll / count):.4f} ({count} tok, {theirs_s:.1f} s) | "
              f"speedup x{theirs_s / ours_s:.2f}, |rel diff| {abs(result.nll_sum / nll - 1):.1e}")


if __name__ == "__main__":
    sys.exit(main())
