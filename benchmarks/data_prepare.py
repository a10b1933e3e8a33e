"""Throughput of `mptkit data prepare` with the GPT-NeoX-20B tokenizer, end to end, against two
references run in the same process on the same text:

  hf-call     the usual way: transformers' tokenizer(list_of_documents) on whole documents
  rust-batch  the Rust tokenizer alone (encode_batch_fast) on the pieces prepare feeds it, with
              nothing else (no reading, no packing, no writing): an upper bound

    .venv/bin/python benchmarks/data_prepare.py [INPUT ...] [--repeat 3]

Default input: data/books/train (15 gzip'd books, ~2.7M tokens). Prints tokens/s and ratios; the
best of --repeat runs is reported for each, with its CPU time (the machine may be shared: the load
average is printed before and after).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mptkit.data.errors import ErrorPolicy  # noqa: E402
from mptkit.data.prepare import DEFAULT_PIECE_CHARS, prepare_pretraining  # noqa: E402
from mptkit.data.sources import iter_segments, resolve_inputs  # noqa: E402
from mptkit.data.tokenizer import load_tokenizer, plain_backend  # noqa: E402


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return usage.ru_utime + usage.ru_stime


def best_of(repeat: int, fn) -> tuple[float, float, int]:
    """(best wall seconds, CPU seconds of that run, tokens)."""
    best, best_cpu, tokens = float("inf"), 0.0, 0
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), cpu_seconds()
        tokens = fn()
        wall, cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
        if wall < best:
            best, best_cpu = wall, cpu
    return best, best_cpu, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", default=[str(Path(__file__).resolve().parent.parent / "data/books/train")])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()

    print(f"load average: {os.getloadavg()[0]:.2f}, cores: {os.cpu_count()}")
    tok = load_tokenizer()
    out = Path(tempfile.mkdtemp(prefix="mptkit-bench-"))
    try:
        def run_prepare() -> int:
            index = prepare_pretraining(args.inputs, out, tokenizer=tok, seq_len=args.seq_len, overwrite=True,
                                        progress=False)
            return index["tokens_tokenized"]

        sources = resolve_inputs(args.inputs)
        documents = ["".join(s.text for s in group) for group in _documents(sources)]
        pieces = [s.text for s in iter_segments(sources, "text", ErrorPolicy("fail"), DEFAULT_PIECE_CHARS)]
        backend = plain_backend(tok)

        def run_rust() -> int:
            return sum(len(e.ids) for e in backend.encode_batch_fast(pieces, add_special_tokens=False)) + len(documents)

        def run_hf() -> int:
            return sum(len(ids) + 1 for ids in tok(documents, add_special_tokens=False)["input_ids"])

        results = {name: best_of(args.repeat, fn) for name, fn in
                   (("prepare", run_prepare), ("rust-batch", run_rust), ("hf-call", run_hf))}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    counts = {tokens for _, _, tokens in results.values()}
    assert len(counts) == 1, f"token counts differ: {results}"
    rate = {name: tokens / seconds for name, (seconds, _, tokens) in results.items()}
    cores = os.cpu_count()
    print(f"{counts.pop():,} tokens from {len(documents)} documents ({sum(map(len, documents)):,} characters)")
    print("  (CPU-bound figure: tokens per CPU-second x cores, what the run would reach with the cores to itself)")
    for name, (seconds, cpu, tokens) in results.items():
        print(f"  {name:<11} {seconds:7.2f} s wall {rate[name] / 1e6:6.2f} M tokens/s | {cpu:6.2f} CPU-s "
              f"-> {tokens / cpu * cores / 1e6:5.2f} M tokens/s CPU-bound")
    print(f"prepare / hf-call = {rate['prepare'] / rate['hf-call']:.2f}x; "
          f"prepare / rust-batch = {rate['prepare'] / rate['rust-batch']:.2f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def _documents(sources):
    """Group text pieces by document (what a plain whole-document call tokenizes)."""
    group = []
    for segment in iter_segments(sources, "text", ErrorPolicy("fail"), DEFAULT_PIECE_CHARS):
        group.append(segment)
        if segment.ends_document:
            yield group
            group = []


if __name__ == "__main__":
    main()
