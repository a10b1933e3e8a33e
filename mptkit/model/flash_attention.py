"""The `flash` backend: FlashAttention-2 (flash-attn >= 2.4) on CUDA, ALiBi via `alibi_slopes`.

flash-attn is optional: the import sits in a try block (transformers' remote-code import check
ignores those), and the backend refuses, naming the reason, wherever it cannot run.
FlashAttention-2 adds `-slope * |i + Sk - Sq - j|` to the scores (queries aligned to the last
keys): mptkit's `-slope * |i - j|` (alibi.py) for causal attention and without a causal mask
alike. It takes causal and sliding-window masks, not per-token ones (key
padding, packed documents, prefix-LM).
"""

from __future__ import annotations

import torch

try:
    import flash_attn
    from flash_attn import flash_attn_func
except ImportError:  # optional dependency (CUDA only)
    flash_attn = None
    flash_attn_func = None

_MIN_VERSION = (2, 4)  # the first release with alibi_slopes


def _installed_version() -> tuple[int, ...] | None:
    if flash_attn is None:
        return None
    return tuple(int(part) for part in flash_attn.__version__.split(".")[:2] if part.isdigit())


def flash_unsupported_reason(q, k, *, mask, alibi_slopes, **_) -> str | None:
    """Why `flash` cannot compute this attention exactly; None when it can."""
    version = _installed_version()
    if version is None or version < _MIN_VERSION:
        return "flash-attn >= 2.4 is not installed"
    if q.device.type != "cuda":
        return f"flash-attn runs on CUDA only (got {q.device.type})"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn runs in float16 / bfloat16 (got {q.dtype})"
    if q.shape[-1] > 256:
        return f"flash-attn supports head dimensions up to 256 (got {q.shape[-1]})"
    if mask.has_per_token_rules:
        return "key padding, packed documents and prefix-LM need per-token masks that flash_attn_func does not take"
    if mask.causal and not (isinstance(mask.query_start, int) and mask.query_start == k.shape[-2] - q.shape[-2]):
        return "its causal mask assumes the queries are the last keys (query_start == Sk - Sq, an int)"
    return None


def flash_attention_backend(q, k, v, *, mask, alibi_slopes, softmax_scale, dropout_p):
    """q (B, H, Sq, D), k/v (B, Hkv, Sk, D) -> (B, H, Sq, D) with flash_attn_func (GQA native)."""
    reason = flash_unsupported_reason(q, k, mask=mask, alibi_slopes=alibi_slopes)
    if reason is not None:
        raise NotImplementedError(f"attn_impl 'flash': {reason}; use 'flex', 'sdpa' or 'auto'")
    window = mask.sliding_window
    window_size = (-1, -1) if window is None else (window, 0 if mask.causal else window)
    out = flash_attn_func(
        q.transpose(1, 2),  # flash-attn takes (B, S, H, D)
        k.transpose(1, 2),
        v.transpose(1, 2),
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=mask.causal,
        window_size=window_size,
        alibi_slopes=None if alibi_slopes is None else alibi_slopes.to(torch.float32),
    )
    return out.transpose(1, 2)
