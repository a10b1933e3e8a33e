"""What each query may attend to (`MaskSpec`), and its dense form with the ALiBi bias.

Every attention backend reads the same `MaskSpec`: the dense backends (torch, sdpa) through
`dense_bias`, FlexAttention through a `mask_mod` that applies the same rules one score at a time
(flex_attention.py), FlashAttention through its causal / window arguments (flash_attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

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
    # Per-forward scratch for backends: the model builds one MaskSpec per forward and every layer
    # attends with it, so a backend builds its mask structure once (e.g. flex's block mask).
    backend_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def has_per_token_rules(self) -> bool:
        return self.key_padding is not None or self.sequence_id is not None or self.prefix is not None

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

    def query_block(self, begin: int, end: int, num_keys: int) -> "MaskSpec":
        """The rules for queries `begin .. end-1` (of this spec's queries) over keys `0 .. num_keys-1`.

        `num_keys` must cover those queries' own positions (their sequence ids are read there).
        """

        def head(tensor):
            return None if tensor is None else tensor[:, :num_keys]

        return replace(
            self,
            query_start=self.query_start + begin,
            key_padding=head(self.key_padding),
            sequence_id=head(self.sequence_id),
            prefix=head(self.prefix),
            backend_cache={},
        )


def dense_bias(
    mask: MaskSpec,
    num_queries: int,
    num_keys: int,
    alibi_slopes: torch.Tensor | None,
    device,
    dtype=torch.float32,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor | None:
    """ALiBi bias with -inf where attention is not allowed, (B|1, H|1, Sq, Sk), computed in `dtype`
    (fp32 or wider) and returned in `out_dtype` (default `dtype`); None when there is neither.
    O(H * Sq * Sk) memory: the dense backends' cost.

    Built once per forward: the result is kept in `mask.backend_cache`, since every layer attends
    with the same mask and the model's one `alibi_slopes` (so in training the layers also share the
    one tensor their backward keeps).
    """
    out_dtype = out_dtype or dtype
    # The sizes are compared, not hashed: under torch.compile with a dynamic key length, hashing
    # would specialize the graph to one length.
    cache_key = ("dense_bias", dtype, out_dtype, str(device), alibi_slopes is None)
    sizes, bias = mask.backend_cache.get(cache_key, (None, None))
    if sizes is None or sizes[0] != num_queries or sizes[1] != num_keys:
        bias = _build_dense_bias(mask, num_queries, num_keys, alibi_slopes, device, dtype)
        bias = None if bias is None else bias.to(out_dtype)
        mask.backend_cache[cache_key] = ((num_queries, num_keys), bias)
    return bias


def _build_dense_bias(mask, num_queries, num_keys, alibi_slopes, device, dtype):
    allowed = mask.allowed(num_queries, num_keys, device)
    if alibi_slopes is None:
        if allowed is None:
            return None
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    query_positions = mask.query_start + torch.arange(num_queries, device=device)
    key_positions = torch.arange(num_keys, device=device)
    bias = alibi_bias(alibi_slopes.to(dtype), query_positions, key_positions)
    if allowed is None:
        return bias
    return torch.where(allowed, bias, torch.tensor(float("-inf"), dtype=bias.dtype, device=device))
