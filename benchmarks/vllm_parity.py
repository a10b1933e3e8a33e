"""Greedy output of vLLM serving an mptkit export (through mptkit's plugin) against `mptkit generate`
on the same export.

Run it with the interpreter of an environment that has both vLLM and mptkit (`make vllm-env` builds
one for vLLM's CPU build: .venv-vllm); without vLLM it says so and exits with status 2. Not part of
`make test` (tests/test_vllm_plugin.py is). The prompts are passages of the held-out books
(data/books/heldout); both sides run greedy decoding in the same dtype on the same device, and the
report gives, per prompt, whether the completions are identical and where they first differ.

    .venv-vllm/bin/python benchmarks/vllm_parity.py out/demo/export --max-new-tokens 64 --dtype float32
    python benchmarks/vllm_parity.py EXPORT --dtype bfloat16 --prompts 32     # a CUDA machine with vLLM

vLLM after v0.28 has no MPT of its own: mptkit's `vllm.general_plugins` entry point registers
mptkit/vllm_plugin for MPTForCausalLM, so the export is served as it is, with no flags.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HELDOUT = REPO / "data/books/heldout"


def unavailable() -> str | None:
    """Why this environment cannot run the comparison (None: it can)."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        return f"vLLM is not importable ({exc}); `make vllm-env` builds an environment with vLLM's CPU build"
    return None


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def heldout_prompts(count: int, chars: int = 400) -> list[str]:
    """`count` passages of `chars` characters, spread over the held-out books, cut at a space."""
    books = [gzip.open(path, "rt", encoding="utf-8").read() for path in sorted(HELDOUT.glob("*.txt.gz"))]
    prompts = []
    for index in range(count):
        book = books[index % len(books)]
        start = (index // len(books) + 1) * len(book) // (count // len(books) + 2)
        passage = book[start : start + chars]
        prompts.append(passage[: passage.rfind(" ")].strip())
    return prompts


def mptkit_completions(export: str, prompts: list[str], args: argparse.Namespace) -> list[str]:
    """`mptkit generate --prompts-file` in a subprocess: the command users run."""
    with tempfile.TemporaryDirectory() as scratch:
        prompts_file = Path(scratch) / "prompts.jsonl"
        prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
        done = subprocess.run(
            [sys.executable, "-m", "mptkit.cli", "generate", export, "--prompts-file", str(prompts_file),
             "--max-new-tokens", str(args.max_new_tokens), "--temperature", "0", "--dtype", args.dtype,
             "--device", device(), "--batch-size", "1"],
            capture_output=True, text=True, check=True, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return [row["completion"] for row in sorted(rows, key=lambda row: row["index"])]


def vllm_completions(export: str, prompts: list[str], args: argparse.Namespace) -> list[str]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=export, dtype=args.dtype, seed=0, gpu_memory_utilization=args.gpu_memory_utilization)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens))
    return [output.outputs[0].text for output in outputs]


def first_difference(a: str, b: str) -> int | None:
    """Index of the first differing character (None: identical)."""
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", help="an HF-format export (mptkit export SOURCE OUT)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="the same on both sides (use bfloat16 where vLLM's attention backend refuses fp32)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.1,
                        help="vLLM's memory share (on a CPU: of RAM, for its KV cache)")
    parser.add_argument("--json", type=Path, help="also write the per-prompt results here")
    args = parser.parse_args(argv)

    reason = unavailable()
    if reason is not None:
        print(f"vllm_parity: not run: {reason}", file=sys.stderr)
        return 2
    prompts = heldout_prompts(args.prompts)
    ours = mptkit_completions(args.export, prompts, args)
    theirs = vllm_completions(args.export, prompts, args)
    rows = [{"prompt": p, "mptkit": a, "vllm": b, "first_difference": first_difference(a, b)}
            for p, a, b in zip(prompts, ours, theirs)]
    same = sum(row["first_difference"] is None for row in rows)
    for index, row in enumerate(rows):
        where = "identical" if row["first_difference"] is None else f"differ from character {row['first_difference']}"
        print(f"prompt {index:2d}: {where}")
    print(f"[vllm_parity] {same}/{len(rows)} greedy completions identical ({args.max_new_tokens} new tokens, "
          f"{args.dtype}, {device()})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    return 0 if same == len(rows) else 1


if __name__ == "__main__":  # the guard vLLM needs: it starts processes
    sys.exit(main())
