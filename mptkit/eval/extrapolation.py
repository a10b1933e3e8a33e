"""Train short, test long: perplexity at 1x .. 16x the training length, as a table and a plot.

Each evaluation length is measured two ways (see perplexity.py): nonoverlapping chunks, and
sliding windows whose stride is a fixed fraction of the window, so that most scored tokens see
close to the full window as context (the ALiBi paper slides by one token; a stride of a quarter
window keeps the cost at 4x nonoverlapping while every token sees at least 3/4 of the window).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mptkit.eval.defaults import DEFAULT_BATCH_TOKENS, DEFAULT_MULTIPLES, DEFAULT_STRIDE_RATIO
from mptkit.eval.perplexity import PerplexityResult, evaluate_perplexity


def sliding_stride(seq_len: int, stride_ratio: float) -> int:
    return max(1, int(seq_len * stride_ratio))


@dataclass(frozen=True)
class SweepPoint:
    seq_len: int
    nonoverlapping: PerplexityResult
    sliding: PerplexityResult | None


def sweep(
    model: torch.nn.Module,
    documents: Sequence[Sequence[int]],
    lengths: Sequence[int],
    *,
    stride_ratio: float | None = DEFAULT_STRIDE_RATIO,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    label: str = "",
) -> list[SweepPoint]:
    """Nonoverlapping (and, unless stride_ratio is None, sliding) perplexity at each length."""
    points = []
    for seq_len in lengths:
        common = dict(batch_tokens=batch_tokens, autocast_dtype=autocast_dtype, progress=progress)
        chunks = evaluate_perplexity(
            model, documents, seq_len, description=f"{label}nonoverlapping @{seq_len}", **common
        )
        sliding = None
        if stride_ratio is not None:
            stride = sliding_stride(seq_len, stride_ratio)
            sliding = evaluate_perplexity(
                model, documents, seq_len, stride, description=f"{label}sliding @{seq_len}/{stride}", **common
            )
        points.append(SweepPoint(seq_len, chunks, sliding))
    return points


def format_ppl(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}"


def markdown_table(lengths: Sequence[int], columns: dict[str, Sequence[float | None]]) -> str:
    """Rows = evaluation lengths, one column per series: the ALiBi paper's table shape."""
    header = "| eval length | " + " | ".join(columns) + " |"
    rule = "|---:|" + "---:|" * len(columns)
    rows = [
        f"| {length} | " + " | ".join(format_ppl(values[i]) for values in columns.values()) + " |"
        for i, length in enumerate(lengths)
    ]
    return "\n".join([header, rule, *rows])


def sweep_columns(points: Sequence[SweepPoint]) -> dict[str, list[float]]:
    columns = {"nonoverlapping": [p.nonoverlapping.perplexity for p in points]}
    if all(p.sliding is not None for p in points):
        columns["sliding"] = [p.sliding.perplexity for p in points]
    return columns


def plot_curves(
    lengths: Sequence[int],
    series: dict[str, Sequence[float | None]],
    train_len: int,
    path: str | Path,
    title: str,
) -> None:
    """Perplexity against evaluation length (log2 axis), a line per series, training length marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    finite = []
    for name, values in series.items():
        xs = [x for x, v in zip(lengths, values) if v is not None and not math.isnan(v)]
        ys = [v for v in values if v is not None and not math.isnan(v)]
        finite += ys
        ax.plot(xs, ys, marker="o", label=name)
    ax.axvline(train_len, color="grey", linestyle="--", linewidth=1, label=f"training length {train_len}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(lengths), [str(x) for x in lengths])
    # a log axis only when the curves span more than a decade (an exploding baseline)
    logarithmic = bool(finite) and max(finite) > 10 * min(finite)
    if logarithmic:
        ax.set_yscale("log")
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity" + (" (log scale)" if logarithmic else ""))
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
