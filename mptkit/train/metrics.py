"""What a user watches during training: throughput and MFU, JSONL / TensorBoard / W&B logs, the
loss curve.

MFU as the PaLM paper (Chowdhery et al. 2022, appendix B) and llm-foundry count it: model FLOPs
per token = 6 * N + 12 * n_layers * d_model * seq_len (N counts every parameter, the tied
embedding included); MFU = achieved FLOP/s / peak FLOP/s. On CPU the peak
is a GEMM of the training dtype measured at start; on GPUs it is the datasheet dense peak.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from mptkit.loading.training_record import METRICS_FILE, read_metrics

from .config import LoggingConfig

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s.
_GPU_BF16_PEAK_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
}


def flops_per_token(n_params: int, n_layers: int, d_model: int, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token, PaLM's formula (see the module docstring)."""
    return 6 * n_params + 12 * n_layers * d_model * seq_len


def measure_gemm_tflops(dtype: torch.dtype, device: torch.device, size: int = 2048, repeats: int = 4) -> float:
    """Best of a few square matmuls in `dtype`: the peak a well-shaped training GEMM can reach."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # warm up (thread pool, kernels, AMX tiles)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def peak_tflops(precision: str, device: torch.device, configured: float | None) -> tuple[float, str]:
    """(peak TFLOP/s of one device, where the number comes from)."""
    if configured is not None:
        return configured, "logging.peak_tflops"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if device.type == "cuda" and precision == "bf16":
        name = torch.cuda.get_device_name(device)
        for key, value in _GPU_BF16_PEAK_TFLOPS.items():
            if key in name:
                return value, f"datasheet bf16 peak of {name}"
    size = 8192 if device.type == "cuda" else 2048
    return measure_gemm_tflops(dtype, device, size=size), f"measured {size}x{size} {dtype} GEMM"


class MetricsLogger:
    """Writes one JSON line per logged step (and TensorBoard / W&B scalars) on the main rank."""

    def __init__(self, config: LoggingConfig, output_dir: Path, run_name: str, run_config: dict, enabled: bool,
                 fresh: bool):
        self.enabled = enabled
        self.jsonl_path = Path(output_dir) / METRICS_FILE
        self._jsonl = None
        self._tensorboard = None
        self._wandb = None
        if not enabled:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        if config.jsonl:
            # A resumed run appends (readers keep the last row per step); a fresh run starts over.
            self._jsonl = open(self.jsonl_path, "w" if fresh else "a")
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise RuntimeError("logging.tensorboard needs the tensorboard package: pip install 'mptkit[train]' "
                                   "(or set logging.tensorboard=false)") from exc
            self._tensorboard = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        if config.wandb:
            try:
                import wandb
            except ImportError as exc:
                raise RuntimeError("logging.wandb needs the wandb package: pip install wandb") from exc
            self._wandb = wandb.init(project=config.wandb_project, name=run_name, config=run_config, resume="allow")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self._jsonl.flush()
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tensorboard is not None:
            for key, value in numbers.items():
                self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def plot_loss_curve(jsonl_path: Path, png_path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(jsonl_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
