"""Attention backends against sequence length: time and peak memory of one causal ALiBi attention.

Backends, on the same inputs in this one process: `torch` (the reference: dense scores), `sdpa`
(scaled_dot_product_attention with the ALiBi + causal bias materialised as a dense mask), `flex`
(compiled FlexAttention; on CPU its backward is mptkit's blockwise one), and on CUDA `flash` when
flash-attn is installed. Forward, and forward + backward, in fp32 and bf16. Runs whose dense score
matrices would not fit in the memory budget are skipped. Flex builds its block mask inside every
timed call (in the model it is built once per forward and shared by all layers).

Memory on CPU is the peak resident set above the inputs (Linux VmHWM, reset before each run); on
CUDA it is torch.cuda.max_memory_allocated above the inputs. Prints a markdown table and the
targets (at 16K flex >= 3x faster than torch with <= 1/20 of its memory; at 2K flex within 1.5x
of sdpa with a materialised bias), writes the rows as JSON and a PNG plot of time and memory.

    .venv/bin/python benchmarks/attention.py                          # CPU: the docs/benchmarks.md table
    .venv/bin/python benchmarks/attention.py --device cuda --dtypes bfloat16 --heads 16 --head-dim 128 \\
        --out out/attention_gpu                                       # GPU: adds TFLOP/s
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mptkit.model.alibi import alibi_slopes  # noqa: E402
from mptkit.model.attention import MaskSpec, attend  # noqa: E402
from mptkit.model.flash_attention import flash_unsupported_reason  # noqa: E402

GIB = 2**30
# Live (B, H, L, L) fp32 matrices at the peak of each dense backend (scores, bias, softmax; backward
# adds their gradients), used only to skip runs that cannot fit.
DENSE_MATRICES = {("torch", "forward"): 3, ("torch", "forward+backward"): 5, ("sdpa", "forward"): 2.5, ("sdpa", "forward+backward"): 4}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=("float32", "bfloat16", "float16"))
    p.add_argument("--backends", nargs="+", default=["torch", "sdpa", "flex", "flash"])
    p.add_argument("--modes", nargs="+", default=["forward", "forward+backward"], choices=("forward", "forward+backward"))
    p.add_argument("--batch", type=int, default=1)
    # 2 heads keep the torch reference within 24 GB at 16K (time and memory scale with heads for all)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--memory-budget-gib", type=float, default=None, help="default: 60%% of available memory")
    p.add_argument("--out", type=Path, default=Path("out/attention"))
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: OUT/attention.png)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Measuring


def _resident(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _available_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    return int(re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1)) * 1024


class PeakMemory:
    """Peak bytes allocated above the level at entry: RSS high-water mark on CPU, the caching
    allocator's peak on CUDA."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS: RSS = live memory
            Path("/proc/self/clear_refs").write_text("5")  # restart VmHWM at the current RSS
            self.baseline = _resident("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.baseline
        else:
            self.peak = _resident("VmHWM") - self.baseline


def causal_attention_flops(batch: int, heads: int, length: int, head_dim: int, mode: str) -> float:
    """Matmul FLOPs of causal attention (half the score matrix): 2 matmuls forward, 5 with backward."""
    forward = 2 * 2 * batch * heads * length * length * head_dim / 2
    return forward if mode == "forward" else 3.5 * forward


WARM: set[tuple] = set()  # (backend, dtype, length) already run in this process


def run_once(backend: str, q, k, v, slopes, mode: str):
    out = attend(q, k, v, impl=backend, mask=MaskSpec(), alibi_slopes=slopes, softmax_scale=1 / math.sqrt(q.shape[-1]))
    if mode == "forward+backward":
        out.backward(torch.ones_like(out))
    return out


def measure(backend: str, dtype: torch.dtype, length: int, mode: str, args) -> dict:
    device = torch.device(args.device)
    generator = torch.Generator(device=device).manual_seed(length)
    shape = (args.batch, args.heads, length, args.head_dim)
    q, k, v = (torch.randn(shape, generator=generator, device=device, dtype=dtype) for _ in range(3))
    if mode == "forward+backward":
        for tensor in (q, k, v):
            tensor.requires_grad_()
    slopes = alibi_slopes(args.heads, device=device)
    # Warm up: compiles flex (a forward suffices: its CPU backward is not compiled; skipped when
    # this shape already ran); on CPU the dense backends' first call at a long length is itself the
    # run. On CUDA every backend warms up (allocator growth, kernel selection) and runs 3 times.
    warm_up_seconds = 0.0
    key = (backend, str(dtype), length)
    cuda = args.device == "cuda"
    if (backend == "flex" and key not in WARM) or length <= 4096 or cuda:
        start = time.perf_counter()
        with torch.no_grad():
            run_once(backend, q, k, v, slopes, "forward")
        warm_up_seconds = time.perf_counter() - start
        WARM.add(key)
    repeats = 3 if length <= 4096 or cuda else 1
    seconds = []
    with PeakMemory(args.device) as memory:
        for _ in range(repeats):
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = run_once(backend, q, k, v, slopes, mode)
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
            del out
            q.grad = k.grad = v.grad = None
    best = min(seconds)
    row = {
        "backend": backend,
        "dtype": str(dtype).removeprefix("torch."),
        "length": length,
        "mode": mode,
        "seconds": best,
        "peak_bytes": memory.peak,
        "warm_up_seconds": round(warm_up_seconds, 2),
        "load_average": round(os.getloadavg()[0], 2),
    }
    if args.device == "cuda":
        row["tflops"] = causal_attention_flops(args.batch, args.heads, length, args.head_dim, mode) / best / 1e12
    return row


def skip_reason(backend: str, dtype: torch.dtype, length: int, mode: str, args, budget: float) -> str | None:
    if backend == "flash":
        probe = torch.zeros(1, 1, 1, args.head_dim, dtype=dtype, device=args.device)
        return flash_unsupported_reason(probe, probe, mask=MaskSpec(), alibi_slopes=None)
    matrices = DENSE_MATRICES.get((backend, mode))
    if matrices is not None:
        need = matrices * args.batch * args.heads * length * length * 4
        if need > budget:
            return f"needs ~{need / GIB:.0f} GiB"
    return None


# ----------------------------------------------------------------------------------------------
# Reporting


def _find(rows, **match):
    for row in rows:
        if all(row.get(key) == value for key, value in match.items()):
            return row
    return None


def table(rows: list[dict], device: str) -> str:
    lines = []
    for mode in dict.fromkeys(row["mode"] for row in rows):
        for dtype in dict.fromkeys(row["dtype"] for row in rows):
            subset = [row for row in rows if row["mode"] == mode and row["dtype"] == dtype]
            backends = list(dict.fromkeys(row["backend"] for row in subset))
            lines.append(f"\n{mode}, {dtype}: seconds / peak memory" + (" / TFLOP/s" if device == "cuda" else ""))
            lines.append("\n| length | " + " | ".join(backends) + " | flex vs torch | flex vs sdpa |")
            lines.append("|---" * (len(backends) + 3) + "|")
            for length in dict.fromkeys(row["length"] for row in subset):
                cells = []
                for backend in backends:
                    row = _find(subset, backend=backend, length=length)
                    if row is None or "skipped" in row:
                        cells.append(row["skipped"] if row else "")
                        continue
                    cell = f"{row['seconds']:.3g} s / {_bytes(row['peak_bytes'])}"
                    if "tflops" in row:
                        cell += f" / {row['tflops']:.1f}"
                    cells.append(cell)
                ratios = [_ratio(subset, length, other) for other in ("torch", "sdpa")]
                lines.append(f"| {length:,} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def _bytes(count: int) -> str:
    return f"{count / GIB:.2f} GiB" if count >= GIB / 4 else f"{count / 2**20:.0f} MiB"


def _ratio(rows, length, other) -> str:
    """'speed-up x, memory /y' of flex against another backend at this length."""
    flex, base = _find(rows, backend="flex", length=length), _find(rows, backend=other, length=length)
    if not flex or not base or "skipped" in flex or "skipped" in base:
        return ""
    memory = base["peak_bytes"] / max(flex["peak_bytes"], 1)
    return f"{base['seconds'] / flex['seconds']:.2f}x faster, {memory:.1f}x less memory"


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, checked on the forward rows of every dtype."""
    lines = []
    for dtype in dict.fromkeys(row["dtype"] for row in rows):
        for mode in ("forward", "forward+backward"):
            kind = dict(dtype=dtype, mode=mode)
            flex16, torch16 = _find(rows, backend="flex", length=16384, **kind), _find(rows, backend="torch", length=16384, **kind)
            if flex16 and torch16 and "skipped" not in flex16 and "skipped" not in torch16:
                speed = torch16["seconds"] / flex16["seconds"]
                memory = flex16["peak_bytes"] / torch16["peak_bytes"]
                verdict = "met" if speed >= 3 and memory <= 1 / 20 else "NOT met"
                lines.append(f"{dtype} {mode} 16K: flex {speed:.1f}x faster than torch, memory 1/{1 / memory:.0f} -> {verdict}")
            flex2, sdpa2 = _find(rows, backend="flex", length=2048, **kind), _find(rows, backend="sdpa", length=2048, **kind)
            if flex2 and sdpa2 and "skipped" not in flex2 and "skipped" not in sdpa2:
                ratio = flex2["seconds"] / sdpa2["seconds"]
                verdict = "met" if ratio <= 1.5 else "NOT met"
                lines.append(f"{dtype} {mode} 2K: flex time = {ratio:.2f}x sdpa-with-bias time -> {verdict}")
    return lines


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [row for row in rows if "skipped" not in row]
    modes = list(dict.fromkeys(row["mode"] for row in measured))
    fig, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 8.5), squeeze=False)
    styles = {"float32": "-", "bfloat16": "--", "float16": ":"}
    for column, mode in enumerate(modes):
        for (backend, dtype) in dict.fromkeys((row["backend"], row["dtype"]) for row in measured if row["mode"] == mode):
            series = sorted((row["length"], row["seconds"], row["peak_bytes"]) for row in measured
                            if row["mode"] == mode and row["backend"] == backend and row["dtype"] == dtype)
            lengths = [s[0] for s in series]
            axes[0][column].plot(lengths, [s[1] for s in series], styles.get(dtype, "-"), marker="o", label=f"{backend} {dtype}")
            axes[1][column].plot(lengths, [max(s[2], 1) / 2**20 for s in series], styles.get(dtype, "-"), marker="o", label=f"{backend} {dtype}")
        axes[0][column].set_title(f"{mode}: time")
        axes[1][column].set_title(f"{mode}: peak memory")
        axes[0][column].set_ylabel("seconds")
        axes[1][column].set_ylabel("MiB above the inputs")
        for axis in (axes[0][column], axes[1][column]):
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xlabel("sequence length (tokens)")
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = args.memory_budget_gib * GIB if args.memory_budget_gib else 0.6 * _available_bytes(args.device)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    header = (
        f"causal ALiBi attention, batch {args.batch}, {args.heads} heads x {args.head_dim}, {device_name}, "
        f"torch {torch.__version__}; memory budget {budget / GIB:.1f} GiB; load average {os.getloadavg()[0]:.2f}"
    )
    print(header, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for mode in args.modes:
            for length in args.lengths:
                for backend in args.backends:
                    reason = skip_reason(backend, dtype, length, mode, args, budget)
                    if reason is not None:
                        row = {"backend": backend, "dtype": dtype_name, "length": length, "mode": mode, "skipped": reason}
                    else:
                        row = measure(backend, dtype, length, mode, args)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    (args.out / "rows.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    print(table(rows, args.device))
    print("\n" + "\n".join(targets(rows)))
    plot_path = args.plot or args.out / "attention.png"
    plot(rows, plot_path, header)
    print(f"\nwrote {args.out / 'rows.json'} and {plot_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
