"""Long context on CPU: a model loaded with a raised max_seq_len prefills N tokens, then generates.

The model (random weights of a preset's shape: speed and memory do not depend on the values) is
saved in HF format at the preset's max_seq_len and loaded back with `max_seq_len` raised, the
StoryWriter recipe (ALiBi has no position table). Generation runs through mptkit's static-cache
`Decoder` (inference/decode.py) with `attn_impl` (default `auto`: flex for the prefill, sdpa with
a one-row bias per head for the one-token steps). For every length: prefill time, decode time per
token, and the peak resident memory above the loaded model and of the whole process (Linux VmHWM,
reset before each run).
Flex is compiled for each length before the measurement, which then excludes compilation.

    .venv/bin/python benchmarks/long_context.py --preset mpt-125m --dtype bfloat16 \\
        --lengths 8192 16384 32768 65536 --new-tokens 8
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mptkit.inference.decode import Decoder  # noqa: E402
from mptkit.loading import load_model  # noqa: E402
from mptkit.inference.sampling import SamplingParams  # noqa: E402
from mptkit.model import MPTConfig, MPTForCausalLM  # noqa: E402
from mptkit.model.alibi import alibi_slopes  # noqa: E402
from mptkit.model.attention import MaskSpec, attend, choose_backend  # noqa: E402

GIB = 2**30


def resident_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) * 1024


def reset_peak() -> None:
    """Return freed heap to the OS, then restart the VmHWM high-water mark at the current RSS."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def compile_attention(model: MPTForCausalLM, length: int, attn_impl: str) -> float:
    """Compile flex for this length before measuring (one attention call of one layer: 1/n_layers
    of the prefill's attention work); seconds taken. Nothing to do for the dense backends."""
    config = model.config
    q = torch.randn(1, config.n_heads, length, config.head_dim, dtype=model.dtype)
    k = torch.randn(1, config.kv_n_heads, length, config.head_dim, dtype=model.dtype)
    rules = dict(mask=MaskSpec(), alibi_slopes=alibi_slopes(config.n_heads, config.attn.alibi_bias_max))
    if attn_impl != "flex" and (attn_impl != "auto" or choose_backend(q, k, **rules) != "flex"):
        return 0.0
    start = time.perf_counter()
    attend(q, k, k, impl="flex", softmax_scale=1 / config.head_dim**0.5, **rules)
    return time.perf_counter() - start


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mpt-125m")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--attn-impl", default="auto", choices=("auto", "flex", "sdpa", "torch"))
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("out/long_context/result.json"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    config = MPTConfig.from_preset(args.preset, attn_config={"attn_impl": args.attn_impl})
    trained_length = config.max_seq_len
    max_seq_len = max(args.lengths) + args.new_tokens
    with tempfile.TemporaryDirectory() as directory:
        MPTForCausalLM(config).to(getattr(torch, args.dtype)).save_pretrained(directory)
        model, _ = load_model(directory, dtype=args.dtype, max_seq_len=max_seq_len)
    kv_bytes_per_token = 2 * config.n_layers * config.kv_n_heads * config.head_dim * model.dtype.itemsize
    print(
        f"{args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {args.dtype}), "
        f"saved with max_seq_len={trained_length}, loaded with max_seq_len={model.config.max_seq_len}; "
        f"attn_impl={args.attn_impl}; {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    rows = []
    for length in args.lengths:
        prompt = torch.randint(2, config.vocab_size, (length,)).tolist()
        compile_seconds = compile_attention(model, length, args.attn_impl)
        decoder = Decoder(model)
        reset_peak()
        baseline = resident_bytes("VmRSS")
        start = time.perf_counter()
        stream = decoder.generate([prompt], [SamplingParams(max_new_tokens=args.new_tokens)])
        tokens = [int(next(stream))]  # the prefill ends with the first new token
        prefill_s = time.perf_counter() - start
        tokens += [int(t) for t in stream]
        decode_s = (time.perf_counter() - start - prefill_s) / max(len(tokens) - 1, 1)
        peak = resident_bytes("VmHWM") - baseline
        row = {
            "length": length,
            "prefill_s": round(prefill_s, 1),
            "prefill_tokens_per_s": round(length / prefill_s, 1),
            "decode_s_per_token": round(decode_s, 3),
            "new_tokens": len(tokens),
            "peak_gib": round(peak / GIB, 3),
            "process_peak_gib": round(resident_bytes("VmHWM") / GIB, 3),
            "kv_cache_gib": round(kv_bytes_per_token * (length + args.new_tokens) / GIB, 3),
            "peak_bytes_per_token": round(peak / length),
            "attention_compile_s": round(compile_seconds, 1),
            "load_average": round(os.getloadavg()[0], 2),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del decoder, stream

    print("\n| prompt tokens | prefill | prefill tok/s | decode s/token | peak memory above the model | of which KV cache | bytes/token |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['length']:,} | {row['prefill_s']:.1f} s | {row['prefill_tokens_per_s']:.0f} | "
            f"{row['decode_s_per_token']:.2f} | {row['peak_gib']:.2f} GiB | {row['kv_cache_gib']:.2f} GiB | "
            f"{row['peak_bytes_per_token']:,} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
