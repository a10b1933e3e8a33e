"""Attention backends behind one entry point, `attend(...)`.

The model describes *what* may attend to what with a `MaskSpec` (causal, padding, packed
documents, prefix-LM, sliding window) and passes ALiBi slopes; each backend decides *how*:

- `torch`: the plain reference. Materialises (B, H, Sq, Sk) scores, fp32 softmax.
- `sdpa`:  `scaled_dot_product_attention`; the ALiBi bias and mask become one dense float mask.

All backends share the ALiBi math in alibi.py and the mask rules in `MaskSpec.allowed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .alibi import alibi_bias


@dataclass
class MaskSpec:
    """Which keys each query may see.

    Indices are positions in the key sequence (a KV cache included); the queries are the keys
    `query_start .. query_start + Sq - 1`. Every per-token tensor covers all Sk keys.
    """

    # An int, or a 0-d tensor: a compiled decode step then reads its position from the tensor
    # and does not recompile when the position moves.
    query_start: int | torch.Tensor = 0
    causal: bool = True
    key_padding: torch.Tensor | None = None  # (B, Sk) bool, True = a real token
    sequence_id: torch.Tensor | None = None  # (B, Sk) int, attention stays inside one document
    prefix: torch.Tensor | None = None  # (B, Sk) bool, the bidirectional prefix of prefix-LM
    sliding_window: int | None = None  # a query sees keys at most this far behind it

    def allowed(self, num_queries: int, num_keys: int, device) -> torch.Tensor | None:
        """Dense boolean mask (B or 1, 1, Sq, Sk), True = may attend; None when nothing is masked."""
        query_index = (self.query_start + torch.arange(num_queries, device=device))[:, None]
        key_index = torch.arange(num_keys, device=device)[None, :]
        allowed = None

        def both(a, b):
            return b if a is None else a & b

        if self.causal:
            causal = key_index <= query_index
            if self.prefix is not None:
                # prefix tokens are visible to every query (and see each other both ways)
                causal = causal[None] | self.prefix[:, None, :]
            allowed = causal
        if self.sliding_window is not None:
            allowed = both(allowed, (query_index - key_index).abs() <= self.sliding_window)
        if self.key_padding is not None:
            allowed = both(allowed, self.key_padding[:, None, :])
        if self.sequence_id is not None:
            query_ids = self.sequence_id[:, self.query_start : self.query_start + num_queries]
            allowed = both(allowed, query_ids[:, :, None] == self.sequence_id[:, None, :])
        if allowed is None:
            return None
        if allowed.dim() == 2:
            allowed = allowed[None]
        # A query always sees itself: keeps rows of padding tokens finite (their outputs are unused)
        # and changes nothing for real tokens, which may always attend to themselves.
        allowed = allowed | (key_index == query_index)[None]
        return allowed[:, None]


AttentionBackend = Callable[..., torch.Tensor]


def _expand_kv(k: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, H, S, D): query head h reads kv head h // (H // Hkv)."""
    groups = n_heads // k.shape[1]
    return k if groups == 1 else k.repeat_interleave(groups, dim=1)


def _dense_bias(q, k, mask: MaskSpec, alibi_slopes, alibi_symmetric) -> torch.Tensor | None:
    """ALiBi bias plus -inf where attention is not allowed, fp32 (B|1, H|1, Sq, Sk); None if neither."""
    num_queries, num_keys = q.shape[-2], k.shape[-2]
    bias = None
    if alibi_slopes is not None:
        query_positions = mask.query_start + torch.arange(num_queries, device=q.device)
        key_positions = torch.arange(num_keys, device=q.device)
        bias = alibi_bias(alibi_slopes, query_positions, key_positions, symmetric=alibi_symmetric)
    allowed = mask.allowed(num_queries, num_keys, q.device)
    if allowed is not None:
        blocked = torch.zeros(allowed.shape, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
        blocked.masked_fill_(~allowed, float("-inf"))
        bias = blocked if bias is None else bias + blocked
    return bias


def torch_attention(q, k, v, *, mask, alibi_slopes, alibi_symmetric, softmax_scale, dropout_p):
    """Reference path: q (B, H, Sq, D), k/v (B, Hkv, Sk, D) -> (B, H, Sq, D)."""
    n_heads = q.shape[1]
    k, v = _expand_kv(k, n_heads), _expand_kv(v, n_heads)
    # softmax in fp32 at least (float64 stays float64 for exactness tests)
    scores = torch.matmul(q, k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32))
    scores = scores * softmax_scale  # (B, H, Sq, Sk)
    bias = _dense_bias(q, k, mask, alibi_slopes, alibi_symmetric)
    if bias is not None:
        scores = scores + bias
    weights = torch.softmax(scores, dim=-1).to(v.dtype)
    if dropout_p:
        weights = F.dropout(weights, p=dropout_p)
    return torch.matmul(weights, v)


def sdpa_attention(q, k, v, *, mask, alibi_slopes, alibi_symmetric, softmax_scale, dropout_p):
    """`scaled_dot_product_attention`; a plain causal mask uses its fused `is_causal` path."""
    num_queries, num_keys = q.shape[-2], k.shape[-2]
    plain_causal = (
        mask.causal
        and alibi_slopes is None
        and mask.key_padding is None
        and mask.sequence_id is None
        and mask.prefix is None
        and mask.sliding_window is None
    )
    enable_gqa = k.shape[1] != q.shape[1]
    if plain_causal and num_queries == num_keys:
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=softmax_scale, dropout_p=dropout_p, enable_gqa=enable_gqa
        )
    if plain_causal and num_queries == 1:  # one new token sees the whole cache
        return F.scaled_dot_product_attention(q, k, v, scale=softmax_scale, dropout_p=dropout_p, enable_gqa=enable_gqa)
    bias = _dense_bias(q, k, mask, alibi_slopes, alibi_symmetric)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias.to(q.dtype), scale=softmax_scale, dropout_p=dropout_p, enable_gqa=enable_gqa
    )


BACKENDS: dict[str, AttentionBackend] = {
    "torch": torch_attention,
    "sdpa": sdpa_attention,
}


def resolve_backend(name: str) -> AttentionBackend:
    """The function for an `attn_impl` name; `auto` picks the fastest correct one available."""
    if name == "auto":
        name = "sdpa"
    if name not in BACKENDS:
        raise ValueError(f"attn_impl {name!r} is not available here; available: {sorted(BACKENDS)} and 'auto'")
    return BACKENDS[name]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    impl: str,
    mask: MaskSpec,
    alibi_slopes: torch.Tensor | None = None,
    alibi_symmetric: bool = False,
    softmax_scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention of q (B, H, Sq, D) over k, v (B, Hkv, Sk, D); returns (B, H, Sq, D)."""
    backend = resolve_backend(impl)
    return backend(
        q,
        k,
        v,
        mask=mask,
        alibi_slopes=alibi_slopes,
        alibi_symmetric=alibi_symmetric,
        softmax_scale=softmax_scale,
        dropout_p=dropout_p,
    )
