"""Attention backends behind one entry point, `attend(...)`.

The model describes *what* may attend to what with a `MaskSpec` (causal, padding, packed
documents, prefix-LM, sliding window) and passes ALiBi slopes; each backend decides *how*:

- `torch`: the plain reference. Materialises (B, H, Sq, Sk) scores, softmax in fp32 (or wider).
- `sdpa`:  `scaled_dot_product_attention`; the ALiBi bias and mask become one dense float mask,
  except for a plain causal mask without ALiBi, which uses its fused `is_causal` kernel.
- `flex`:  compiled FlexAttention, O(L) memory: ALiBi as a score_mod, masks as a block mask
  (flex_attention.py).
- `flash`: FlashAttention-2 with `alibi_slopes`, CUDA only, when flash-attn >= 2.4 is installed
  (flash_attention.py).
- `auto`:  per call, the fastest of these that computes the attention exactly (`choose_backend`).

All backends share the ALiBi math in alibi.py and the mask rules of `MaskSpec` (attention_masks.py).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .attention_masks import MaskSpec, dense_bias
from .flash_attention import flash_attention_backend, flash_unsupported_reason
from .flex_attention import flex_attention_backend, flex_supported

__all__ = ["BACKENDS", "MaskSpec", "attend", "choose_backend", "resolve_backend"]

AttentionBackend = Callable[..., torch.Tensor]


def _expand_kv(k: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, H, S, D): query head h reads kv head h // (H // Hkv)."""
    groups = n_heads // k.shape[1]
    return k if groups == 1 else k.repeat_interleave(groups, dim=1)


def _wide(dtype: torch.dtype) -> torch.dtype:
    """Softmax and bias precision: fp32 at least (float64 stays float64 for exactness tests)."""
    return torch.promote_types(dtype, torch.float32)


def torch_attention(q, k, v, *, mask, alibi_slopes, softmax_scale, dropout_p):
    """Reference path: q (B, H, Sq, D), k/v (B, Hkv, Sk, D) -> (B, H, Sq, D)."""
    n_heads, num_queries, num_keys = q.shape[1], q.shape[-2], k.shape[-2]
    k, v = _expand_kv(k, n_heads), _expand_kv(v, n_heads)
    scores = torch.matmul(q, k.transpose(-1, -2)).to(_wide(q.dtype)) * softmax_scale  # (B, H, Sq, Sk)
    bias = dense_bias(mask, num_queries, num_keys, alibi_slopes, q.device, _wide(q.dtype))
    if bias is not None:
        scores = scores + bias
    weights = torch.softmax(scores, dim=-1).to(v.dtype)
    del scores
    if dropout_p:
        weights = F.dropout(weights, p=dropout_p)
    return torch.matmul(weights, v)


def _plain_causal(mask: MaskSpec, alibi_slopes) -> bool:
    """Causal with nothing else: what sdpa's fused kernels take without a dense mask."""
    return mask.causal and alibi_slopes is None and not mask.has_per_token_rules and mask.sliding_window is None


def sdpa_attention(q, k, v, *, mask, alibi_slopes, softmax_scale, dropout_p):
    """`scaled_dot_product_attention`; a plain causal mask uses its fused `is_causal` path."""
    num_queries, num_keys = q.shape[-2], k.shape[-2]
    enable_gqa = k.shape[1] != q.shape[1]
    if _plain_causal(mask, alibi_slopes) and num_queries == num_keys:
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=softmax_scale, dropout_p=dropout_p, enable_gqa=enable_gqa
        )
    if _plain_causal(mask, alibi_slopes) and num_queries == 1:  # one new token sees the whole cache
        return F.scaled_dot_product_attention(q, k, v, scale=softmax_scale, dropout_p=dropout_p, enable_gqa=enable_gqa)
    bias = dense_bias(mask, num_queries, num_keys, alibi_slopes, q.device, _wide(q.dtype), q.dtype)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, scale=softmax_scale, dropout_p=dropout_p, enable_gqa=enable_gqa
    )


BACKENDS: dict[str, AttentionBackend] = {
    "torch": torch_attention,
    "sdpa": sdpa_attention,
    "flex": flex_attention_backend,
    "flash": flash_attention_backend,
}

# Inference: below this many query x key scores `auto` keeps the dense sdpa path (building a bias of
# this size costs less than flex's block mask and kernel launch, and needs no compilation); flex is
# faster from ~512 tokens on the 2-core CPU (docs/benchmarks.md, "Attention"). GPUs use the same
# value, not measured.
AUTO_FLEX_MIN_SCORES = 512 * 512
# Training on CPU: flex has no fused CPU backward (mptkit's is blockwise torch), so sdpa's fused one
# is faster at every measured length; but sdpa keeps its dense bias alive for the backward.
# `auto` trains with sdpa while that bias stays under this size, with flex beyond.
AUTO_CPU_TRAINING_MAX_DENSE_BIAS_BYTES = 256 * 2**20


def choose_backend(q, k, *, mask: MaskSpec, alibi_slopes, dropout_p: float = 0.0) -> str:
    """What `auto` runs: the fastest backend that computes this attention exactly here.

    - CUDA with flash-attn installed, half precision, masks it takes: `flash`.
    - Causal without ALiBi or other masks, prefill or one-token decode: `sdpa` (fused, O(L)).
    - One-token decode: `sdpa` (its dense bias is one row per head, O(Sk)).
    - Long sequences with ALiBi or masks: `flex` (O(L) memory; faster than a dense bias from ~512
      tokens). Training on CPU: `sdpa` (its fused backward is faster) while its dense bias stays
      under 256 MiB, `flex` beyond.
    - Otherwise `sdpa` with a dense bias: short sequences, dropout, dtypes or CPUs flex lacks.
    """
    num_queries, num_keys = q.shape[-2], k.shape[-2]
    if flash_unsupported_reason(q, k, mask=mask, alibi_slopes=alibi_slopes) is None:
        return "flash"
    if num_queries == 1 or (_plain_causal(mask, alibi_slopes) and num_queries == num_keys):
        return "sdpa"
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if training and q.device.type == "cpu":
        dense_bias_bytes = q.shape[0] * q.shape[1] * num_queries * num_keys * 4
        if dense_bias_bytes <= AUTO_CPU_TRAINING_MAX_DENSE_BIAS_BYTES:
            return "sdpa"
    elif num_queries * num_keys < AUTO_FLEX_MIN_SCORES:
        return "sdpa"
    if dropout_p or q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not flex_supported(q.device.type):
        return "sdpa"
    return "flex"


def resolve_backend(name: str) -> AttentionBackend:
    """The function for an explicit `attn_impl` name (`auto` is resolved per call in `attend`)."""
    if name not in BACKENDS:
        raise ValueError(f"attn_impl {name!r} is not available; choose one of {sorted(BACKENDS)} or 'auto'")
    return BACKENDS[name]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    impl: str,
    mask: MaskSpec,
    alibi_slopes: torch.Tensor | None = None,
    softmax_scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention of q (B, H, Sq, D) over k, v (B, Hkv, Sk, D); returns (B, H, Sq, D)."""
    if impl == "auto":
        impl = choose_backend(q, k, mask=mask, alibi_slopes=alibi_slopes, dropout_p=dropout_p)
    backend = resolve_backend(impl)
    return backend(
        q,
        k,
        v,
        mask=mask,
        alibi_slopes=alibi_slopes,
        softmax_scale=softmax_scale,
        dropout_p=dropout_p,
    )
