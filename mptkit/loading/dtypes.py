"""The dtype vocabulary of every command: names long and short, and what `auto` means on this machine."""

from __future__ import annotations

from pathlib import Path

import torch

# Names a user may give, long and short (training configs say fp32/bf16), and "auto".
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def cpu_supports_bf16() -> bool:
    """bf16 matmuls pay off on CPUs with native bf16 (AVX512-BF16 or AMX); elsewhere they are emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """A dtype name -> torch dtype. `auto`: bf16 on CUDA with bf16 (else fp16) and on CPUs with
    native bf16, fp32 elsewhere."""
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_supports_bf16() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {', '.join(('auto', *DTYPES))}")
    return DTYPES[name]
