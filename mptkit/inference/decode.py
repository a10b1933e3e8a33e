"""Fast decoding in gpt-fast's shape: a static KV cache, a separate prefill, a compiled one-token step.

- `StaticKVCache` preallocates every layer's keys and values for the whole generation and writes
  new ones by index. The model's own attention modules call `cache.update(k, v, layer_idx)`, so
  GQA, clip_qkv, qk_ln, RoPE and the attention backends are the model's code, not a copy.
- Keys not yet written lie in the future of every query, so the model's causal rule hides them;
  left padding is hidden by the cache's key-validity mask. ALiBi reads the query position from a
  tensor (`MaskSpec.query_start`), so the one-token step has fixed shapes for the whole
  generation and compiles once.
- `Decoder.prefill` runs the prompt with exactly the shapes of the model's plain forward; the
  step then attends over the preallocated length.
- `quantize_int8` swaps the block and head projections for weight-only int8 ones.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mptkit.model import MPTForCausalLM
from mptkit.model.attention import MaskSpec
from mptkit.model.modeling_mpt import token_positions

from .sampling import BatchSampler, SamplingParams


CACHE_LENGTH_STEP = 128


class StaticKVCache:
    """Keys and values of every layer, (B, Hkv, max_length, D) each, written in place by index.

    `write_positions` (S,) says where `update` writes the current chunk; `visible` how many keys it
    returns (the prompt length during prefill, all of them during decode steps; None: every column
    its tensors have, for a cache whose tensors are views of another's first columns).
    """

    def __init__(self, model: MPTForCausalLM, batch_size: int, max_length: int):
        config = model.config
        weight = model.transformer.wte.weight
        shape = (batch_size, config.kv_n_heads, max_length, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in range(config.n_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.max_length = max_length
        self.key_valid = torch.ones(batch_size, max_length, dtype=torch.bool, device=weight.device)
        self.padding = torch.zeros(batch_size, dtype=torch.long, device=weight.device)  # left pads per row
        self.write_positions = torch.zeros(1, dtype=torch.long, device=weight.device)
        self.visible = max_length

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.write_positions, k)
        values.index_copy_(2, self.write_positions, v)
        return keys[:, :, : self.visible], values[:, :, : self.visible]


def forward_with_cache(
    model: MPTForCausalLM, tokens: torch.Tensor, start, cache: StaticKVCache, key_padding, positions
) -> torch.Tensor:
    """Logits (B, V) of the last of `tokens` (B, S), whose first one sits at position `start`.

    The model's own pieces (embed, run_blocks) with the static cache and a MaskSpec for it; the
    head is `compute_logits` with the decode-friendly product. `start` is an int or a (1,) tensor.
    """
    transformer = model.transformer
    x = transformer.embed(transformer.wte(tokens), positions)
    mask = MaskSpec(query_start=start, causal=True, key_padding=key_padding, sliding_window=transformer.sliding_window)
    hidden = transformer.run_blocks(x, mask, positions, cache)[:, -1]
    head = getattr(model, "int8_head", None)  # set by quantize_int8
    if head is None:
        head = getattr(model, "lm_head", None)  # untied
    logits = head(hidden) if head is not None else streaming_linear(hidden, transformer.wte.weight)
    if model.logit_multiplier is not None:
        logits = logits * model.logit_multiplier
    return logits.float()


# ----------------------------------------------------------------------------------------------
# Matrix-vector products at memory speed


def _streams_as_reduction(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One row of activations against a half-precision or int8 weight on CPU, inside torch.compile."""
    return (
        torch.compiler.is_compiling()
        and x.device.type == "cpu"
        and weight.dtype in (torch.bfloat16, torch.float16, torch.int8)
        and x.numel() == x.shape[-1]
    )


def materialize(x: torch.Tensor) -> torch.Tensor:
    """`x` as a buffer of its own inside a compiled graph (a no-op outside one).

    Inductor inlines a pointwise producer (a LayerNorm, a GELU) into the reduction that reads it,
    which for a matrix-vector product recomputes the producer once per output row: 3072 erf
    evaluations per row of down_proj. Forcing the layout realizes the vector once, at no runtime
    cost. Needs `enable_compiled_decoding()` first.
    """
    return torch.ops.prims.inductor_force_stride_order(x, x.stride())


def enable_compiled_decoding() -> None:
    """Register inductor's prims (`materialize` uses one); a heavy import, done only to compile."""
    import torch._inductor.inductor_prims  # noqa: F401


def streaming_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; for a decode step on CPU (one row, bf16 weights, compiled) written as a fused
    multiply-and-sum, which inductor turns into one pass over the weight at memory bandwidth.

    Why: oneDNN's bf16 GEMV for a single row is compute-bound on AVX512-BF16 CPUs (measured ~7.5
    GB/s of weights per core, vs ~12.5 GB/s for the fused reduction and for memory itself).
    Accumulation is fp32 in both.
    """
    if not _streams_as_reduction(x, weight):
        return F.linear(x, weight, bias)
    out = _row_dot_products(x, weight).to(x.dtype)
    return out if bias is None else out + bias


def _row_dot_products(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., in) against every row of weight (out, in), in fp32: (..., out)."""
    # x is realized once in fp32, not converted again for every row of the weight, and each row
    # is summed in 4 vector-aligned parts (4 independent accumulators instead of one serial chain
    # of vector adds): together ~7% more tokens/s (mpt-125m, bf16, 2 cores). Inductor then keeps a
    # fused producer's (e.g. GELU's) fp32 result instead of rounding it to bf16 as eager mode does.
    parts = 4 if weight.shape[-1] % 128 == 0 else 1
    products = materialize(x.float()).unflatten(-1, (1, parts, -1)) * weight.float().unflatten(-1, (parts, -1))
    return products.sum(-1).sum(-1)


class StreamingLinear(nn.Linear):
    """nn.Linear computed by `streaming_linear` (same parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return streaming_linear(x, self.weight, self.bias)


def use_streaming_linears(model: MPTForCausalLM) -> None:
    """Make the projections (and an untied head) `StreamingLinear`s, in place; their eager
    behaviour is unchanged."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = StreamingLinear


class Decoder:
    """Batched generation from token ids with a static cache and (optionally) a compiled step.

    The model is used as given (dtype, device, quantization), put in eval mode and its block
    projections made `StreamingLinear`s. `compile=True` compiles the one-token step once per
    (batch size, cache length) with `fullgraph=True`.
    """

    def __init__(self, model: MPTForCausalLM, compile: bool = False):
        self.model = model.eval()
        self.config = model.config
        self.device = model.transformer.wte.weight.device
        self.uses_positions = hasattr(model.transformer, "wpe") or model.transformer.rope_theta is not None
        use_streaming_linears(model)
        self._step = self.decode_step
        if compile:
            enable_compiled_decoding()
            self._step = torch.compile(self.decode_step, fullgraph=True)

    @property
    def context_length(self) -> int:
        return self.config.max_seq_len

    def decode_step(self, tokens: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """Logits (B, V) after one new token per row at position cache.write_positions, attending
        over the first `cache.visible` keys (row b's own position: write position - padding[b])."""
        position = cache.write_positions
        positions = (position - cache.padding)[:, None] if self.uses_positions else None
        key_valid = cache.key_valid[:, : cache.visible]
        return forward_with_cache(self.model, tokens, position, cache, key_valid, positions)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, valid: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """Run the left-padded prompts (B, S) (`valid` False on padding); logits of the last position."""
        length = tokens.shape[1]
        cache.key_valid[:, :length] = valid
        cache.padding = (~valid).sum(dim=1)
        cache.write_positions = torch.arange(length, device=self.device)
        cache.visible = length
        key_padding = None if bool(valid.all()) else valid  # as the plain forward does
        positions = token_positions(tokens.shape[0], length, 0, valid, None, self.device) if self.uses_positions else None
        logits = forward_with_cache(self.model, tokens, 0, cache, key_padding, positions)
        cache.write_positions = torch.full((1,), length, dtype=torch.long, device=self.device)
        cache.visible = cache.max_length
        return logits

    @torch.no_grad()
    def prefill_chunk(self, tokens: torch.Tensor, start: int, cache: StaticKVCache) -> torch.Tensor:
        """Run `tokens` (B, S), unpadded, at positions start .. start+S-1 of `cache`, whose first
        `start` keys hold the earlier part of the same prompts; logits of the last position.
        A prompt prefilled in chunks this way gives the keys of one `prefill` of the whole prompt."""
        batch, length = tokens.shape
        cache.write_positions = torch.arange(start, start + length, device=self.device)
        cache.visible = start + length
        positions = None
        if self.uses_positions:
            positions = torch.arange(start, start + length, device=self.device).expand(batch, length)
        logits = forward_with_cache(self.model, tokens, start, cache, None, positions)
        cache.visible = cache.max_length
        return logits

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], params: list[SamplingParams], pad_id: int = 0
    ) -> Iterator[torch.Tensor]:
        """Yield the next token of every row, (B,) on the device, until the longest request is done
        or the context is full. Close the iterator (or stop iterating) to end early.
        """
        if len(prompts) != len(params) or not prompts:
            raise ValueError("generate: give one SamplingParams per prompt, and at least one prompt")
        longest = max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0:
            raise ValueError("generate: every prompt needs at least one token")
        if longest >= self.context_length:
            raise ValueError(f"prompt of {longest} tokens leaves no room in the context of {self.context_length}")
        new_tokens = min(max(p.max_new_tokens for p in params), self.context_length - longest)
        # cache lengths come in steps of CACHE_LENGTH_STEP, so that a compiled step is reused
        # across generations of similar lengths
        cache_length = min(self.context_length, -(-(longest + new_tokens) // CACHE_LENGTH_STEP) * CACHE_LENGTH_STEP)
        tokens = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
        valid = torch.zeros(len(prompts), longest, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            tokens[row, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            valid[row, longest - len(prompt) :] = True
        tokens, valid = tokens.to(self.device), valid.to(self.device)

        sampler = BatchSampler(params, self.config.vocab_size, self.device)
        sampler.observe(tokens, valid)
        cache = StaticKVCache(self.model, len(prompts), cache_length)
        next_tokens = sampler(self.prefill(tokens, valid, cache))
        for _ in range(new_tokens - 1):
            yield next_tokens
            sampler.observe(next_tokens[:, None])
            logits = self._step(next_tokens[:, None], cache)
            cache.write_positions += 1
            next_tokens = sampler(logits)
        yield next_tokens


# ----------------------------------------------------------------------------------------------
# int8 weight-only quantization


class Int8Linear(nn.Module):
    """y = x @ (scale * W_int8)^T (+ b): symmetric per-output-channel int8 weights, activations
    unchanged. Halves the bytes read per token versus bf16, which is what bounds decoding."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        weight = weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.register_buffer("weight", (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(compute_dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _streams_as_reduction(x, self.weight):
            out = (_row_dot_products(x, self.weight) * self.scales).to(x.dtype)
            return out if self.bias is None else out + self.bias
        flat = x.reshape(-1, self.in_features).to(self.scales.dtype)
        if flat.device.type == "cpu":
            # fused dequantize + matmul kernel: the int8 weight is never expanded in memory
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)
        else:
            out = F.linear(flat, self.weight.to(flat.dtype)) * self.scales
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


@torch.no_grad()
def quantize_int8(model: MPTForCausalLM) -> MPTForCausalLM:
    """Replace every block projection and the LM head by `Int8Linear`, in place.

    The embedding table keeps its dtype for the input lookup (one row per token); the tied head
    gets its own int8 copy, since the head is where the per-token bytes are.
    """
    dtype = model.transformer.wte.weight.dtype
    for block in model.transformer.blocks:
        for parent in (block.attn, block.ffn):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child.weight, child.bias, dtype))
    head = model.lm_head.weight if hasattr(model, "lm_head") else model.transformer.wte.weight
    model.int8_head = Int8Linear(head, None, dtype)
    return model
