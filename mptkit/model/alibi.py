"""ALiBi (Press, Smith & Lewis, ICLR 2022) as MPT defines it: the one place for its math.

Every attention backend takes its slopes and its bias from here. The bias is computed from
relative positions (j - i) in fp32: MPT's original key-only form `m * (j - (S-1))` carries a
per-row offset of up to m*S that bf16 cannot represent accurately at long lengths.
"""

from __future__ import annotations

import math

import torch

# MPT's (and the paper's) bias bound b: every published MPT but storywriter (16) uses it, and
# transformers' own MptForCausalLM implements only it. The one place this default is written.
DEFAULT_ALIBI_BIAS_MAX = 8


def alibi_slopes(
    n_heads: int, alibi_bias_max: float = DEFAULT_ALIBI_BIAS_MAX, device=None, dtype=torch.float32
) -> torch.Tensor:
    """MPT's per-head slopes, shape (n_heads,), computed in float64 and returned in `dtype`.

    With n' = 2^ceil(log2(n_heads)) the candidate slopes are m_k = 2^(-k * b / n'), k = 1..n'.
    For a power-of-two head count they are used in order; otherwise MPT takes the even-indexed
    ones (m_2, m_4, ...) first, then the odd ones, until n_heads slopes are chosen.
    """
    if n_heads < 1:
        raise ValueError(f"alibi_slopes: n_heads must be >= 1, got {n_heads}")
    padded_heads = 2 ** math.ceil(math.log2(n_heads))
    exponents = torch.arange(1, padded_heads + 1, dtype=torch.float64, device=device)
    slopes = torch.pow(2.0, -exponents * (alibi_bias_max / padded_heads))
    if padded_heads != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[0::2]])[:n_heads]
    return slopes.to(dtype)


def alibi_bias(
    slopes: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
) -> torch.Tensor:
    """The additive score bias `-m_h * |i - j|`: the distance, whichever side of the query a key is.

    slopes: (H,); query_positions: (Sq,); key_positions: (Sk,). Returns (1, H, Sq, Sk) in fp32, or
    in the slopes' dtype when that is wider.
    For the keys a causal query sees (j <= i) this is -m(i-j), which differs from MPT's key-only
    bias by a per-row constant that softmax cancels, so the outputs are MPT's; the keys after a
    query that a prefix-LM's prefix lets it see get the symmetric bias, as in llm-foundry. One rule,
    so no caller passes whether the model is a prefix-LM: the mask (`MaskSpec.prefix`) says it.
    """
    dtype = torch.promote_types(slopes.dtype, torch.float32)
    relative = key_positions.to(dtype)[None, :] - query_positions.to(dtype)[:, None]
    return (slopes.to(dtype)[:, None, None] * -relative.abs())[None]


def alibi_score(slope: torch.Tensor, query_index: torch.Tensor, key_index: torch.Tensor):
    """Elementwise form of `alibi_bias` for fused kernels (FlexAttention score_mod): one score's bias."""
    return slope * -(key_index - query_index).abs()
