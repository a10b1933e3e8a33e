"""The `flex` backend: MPT attention in O(L) memory with torch's FlexAttention, on CPU and GPU.

`flex_attention` compiled by torch.compile fuses attention into one kernel (inductor's C++
template on CPU, Triton on GPU) that never materialises the (Sq, Sk) score matrix:

- ALiBi is a `score_mod`: `alibi_score` of the query and key positions, relative and in fp32.
- causal, key padding, packed documents, prefix-LM and sliding window are a `mask_mod` applying
  `MaskSpec.allowed`'s rules one score at a time; it becomes a block-sparse `BlockMask` once per
  forward (shared by every layer), and blocks no query may see are skipped.
- GQA / MQA read the shared KV heads inside the kernel (`enable_gqa`), without repeating them.

Compiled code is specialised to shapes, so lengths are padded to a few static sizes
(`static_length`): nearby lengths share one compiled kernel, the padded keys are masked out (their
blocks are skipped), and a KV-cache decode step (one query over a growing cache) recompiles only
when the cache crosses into the next size, not per token. The query position is a tensor read by
the kernel, so a moving position never recompiles. (Dynamic shapes would avoid the padding, but in
torch 2.13 inductor's CPU flex template miscompiles dynamic-shape kernels whose mask reads
per-token tensors.)

On CPU the compiled kernel has no backward. `_FlexWithBlockwiseBackward` keeps the flex forward
and recomputes the gradients one block of queries at a time in plain torch: O(block x Sk) memory.
On GPU flex's own backward kernel is used.

Compiled code is cached on disk by inductor (/tmp/torchinductor_$USER, or TORCHINDUCTOR_CACHE_DIR):
a new process re-traces each shape in a second or two instead of compiling it again.
"""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .alibi import alibi_score
from .attention_masks import MaskSpec, dense_bias

BLOCK_SIZE = 128  # flex's sparse block: the granularity of the block mask and of the padding
# Each (shape, dtype, mask rules) is one compiled entry; dynamo's default limit of 8 would silently
# fall back to eager flex, which materialises the scores.
_RECOMPILE_LIMIT = 256
# From this many scores on, the block mask is built by a compiled function: eager construction
# evaluates the mask densely (O(Sq x Sk) memory, ~0.1 s of overhead per call), compiled
# construction never materialises it but costs a compilation per padded shape. Decode steps
# (one query) always compile: once per cache size, then well under a millisecond per step.
_COMPILED_MASK_MIN_SCORES = 1024 * 1024
# Query rows per block of the CPU backward: up to 2^24 scores (64 MB per fp32 intermediate), at
# least 32 rows (matmuls stay efficient; memory stays linear in the length), at most 256 rows (under
# a causal mask a block stops at its last query's key, so small blocks skip most masked scores).
_BACKWARD_BLOCK_SCORES = 1 << 24
_BACKWARD_ROWS = (32, 256)
_FLEX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def static_length(length: int) -> int:
    """The padded length a call with `length` tokens runs at.

    Up to one block: the next power of two (decode steps run at 1). Beyond: whole blocks, rounded
    up to a count with at most three significant bits (8, 10, 12, 14, 16, 20, ... blocks), so at
    most 25% padding and four compiled sizes per doubling of the length.
    """
    if length <= BLOCK_SIZE:
        return 1 << (length - 1).bit_length()
    blocks = -(-length // BLOCK_SIZE)
    step = 1 << max(blocks.bit_length() - 3, 0)
    return -(-blocks // step) * step * BLOCK_SIZE


@functools.cache
def flex_supported(device_type: str) -> bool:
    """Whether compiled flex attention can run here: Triton on GPU; on CPU an x86 CPU with AVX2
    (inductor's C++ flex template) and a C++ compiler to build it."""
    if device_type == "cuda":
        try:
            import triton  # noqa: F401  (inductor's GPU code generator)
        except ImportError:
            return False
        return True
    if device_type == "cpu":
        compilers = (os.environ.get("CXX"), "g++", "clang++", "c++")
        has_compiler = any(name and shutil.which(name) for name in compilers)
        return has_compiler and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return False


@functools.cache
def _compiled_functions():
    return torch.compile(flex_attention, dynamic=False), torch.compile(create_block_mask, dynamic=False)


def _call_compiled(index: int, *args, **kwargs):
    """Call compiled flex_attention (index 0) or create_block_mask (index 1).

    Inside a caller's own torch.compile (e.g. a compiled decode step) the plain functions are
    called and traced into the caller's graph.
    """
    if torch.compiler.is_compiling():
        return (flex_attention, create_block_mask)[index](*args, **kwargs)
    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
        return _compiled_functions()[index](*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# Mask and score modifiers


def _mask_mod(mask: MaskSpec, query_offset, num_keys, key_padding, sequence_id, prefix, last_key: int):
    """`MaskSpec.allowed` for one (query, key) pair; keys at or past `num_keys` are padding."""
    causal, window = mask.causal, mask.sliding_window

    def mask_mod(batch, head, query_index, key_index):
        query_position = query_index + query_offset
        real_key = key_index < num_keys
        allowed = real_key
        if causal:
            visible = key_index <= query_position
            if prefix is not None:
                visible = visible | prefix[batch, key_index]
            allowed = allowed & visible
        if window is not None:
            allowed = allowed & ((query_position - key_index).abs() <= window)
        if key_padding is not None:
            allowed = allowed & key_padding[batch, key_index]
        if sequence_id is not None:
            # padded query rows may lie past the last key: clamp their (unused) lookup
            own_document = sequence_id[batch, query_position.clamp(max=last_key)]
            allowed = allowed & (sequence_id[batch, key_index] == own_document)
        return allowed | (real_key & (key_index == query_position))  # a query always sees itself

    return mask_mod


def _alibi_score_mod(slopes: torch.Tensor, query_offset: torch.Tensor):
    def score_mod(score, batch, head, query_index, key_index):
        return score + alibi_score(slopes[head], query_index + query_offset, key_index)

    return score_mod


@dataclass
class _Plan:
    """What every layer of one forward shares for one (Sq, Sk): padded lengths and the block mask."""

    query_length: int
    key_length: int
    query_offset: torch.Tensor  # 0-d int64: position of the first query among the keys
    block_mask: BlockMask


def _plan(mask: MaskSpec, num_queries: int, num_keys: int, device: torch.device) -> _Plan:
    cache_key = ("flex", num_queries, num_keys, str(device))
    plan = mask.backend_cache.get(cache_key)
    if plan is None:
        plan = mask.backend_cache[cache_key] = _build_plan(mask, num_queries, num_keys, device)
    return plan


def _build_plan(mask: MaskSpec, num_queries: int, num_keys: int, device: torch.device) -> _Plan:
    query_length, key_length = static_length(num_queries), static_length(num_keys)
    query_offset = torch.as_tensor(mask.query_start, device=device).reshape(()).to(torch.int64)
    key_count = torch.tensor(num_keys, device=device)

    def padded(tensor, value):
        return None if tensor is None else F.pad(tensor, (0, key_length - num_keys), value=value)

    per_token = [t for t in (mask.key_padding, mask.sequence_id, mask.prefix) if t is not None]
    mask_mod = _mask_mod(
        mask,
        query_offset,
        key_count,
        key_padding=padded(mask.key_padding, False),
        sequence_id=padded(mask.sequence_id, -1),
        prefix=padded(mask.prefix, False),
        last_key=key_length - 1,
    )
    batch = per_token[0].shape[0] if per_token else 1
    # On CPU, blocks no larger than the (padded) lengths: then no length needs padding to whole
    # blocks, which inductor's CPU code generator miscompiles for boolean masks in torch 2.13. The
    # GPU kernels expect whole 128-blocks and pad short queries (decode steps) themselves.
    block_size = (BLOCK_SIZE, BLOCK_SIZE)
    if device.type == "cpu":
        block_size = (min(query_length, BLOCK_SIZE), min(key_length, BLOCK_SIZE))
    arguments = (mask_mod, batch, 1, query_length, key_length)
    if query_length == 1 or query_length * key_length >= _COMPILED_MASK_MIN_SCORES:
        block_mask = _call_compiled(1, *arguments, device=device, BLOCK_SIZE=block_size)
    else:  # small: evaluating the mask densely costs less than compiling it
        block_mask = create_block_mask(*arguments, device=device, BLOCK_SIZE=block_size)
    return _Plan(query_length, key_length, query_offset, block_mask)


# ----------------------------------------------------------------------------------------------
# The backend


def flex_attention_backend(q, k, v, *, mask, alibi_slopes, softmax_scale, dropout_p):
    """q (B, H, Sq, D), k/v (B, Hkv, Sk, D) -> (B, H, Sq, D), via compiled FlexAttention."""
    if dropout_p:
        raise NotImplementedError("attn_impl 'flex' has no attention dropout (attn_pdrop > 0): use 'sdpa' or 'torch'")
    if q.dtype not in _FLEX_DTYPES:
        raise NotImplementedError(f"attn_impl 'flex' runs in {[str(d) for d in _FLEX_DTYPES]}, not {q.dtype}")
    num_queries, num_keys = q.shape[-2], k.shape[-2]
    if torch.compiler.is_compiling() and (q.device.type == "cpu" or num_queries == 1):
        return _inside_callers_compile(q, k, v, mask, alibi_slopes, softmax_scale)
    plan = _plan(mask, num_queries, num_keys, q.device)
    score_mod = None
    if alibi_slopes is not None:
        score_mod = _alibi_score_mod(alibi_slopes.to(q.device, torch.float32), plan.query_offset)

    def run(q, k, v):
        out = _call_compiled(
            0,
            _pad_length(q, plan.query_length),
            _pad_length(k, plan.key_length),
            _pad_length(v, plan.key_length),
            score_mod=score_mod,
            block_mask=plan.block_mask,
            scale=softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        return out[:, :, :num_queries]

    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if needs_grad and q.device.type == "cpu":
        return _FlexWithBlockwiseBackward.apply(q, k, v, run, mask, alibi_slopes, softmax_scale)
    return run(q, k, v)


def _inside_callers_compile(q, k, v, mask, alibi_slopes, softmax_scale):
    """Flex called inside the caller's own torch.compile on CPU, or for a one-query step on any
    device (e.g. a compiled decode step).

    Inductor's flex lowering rejects masks and padding computed inside the caller's graph: on CPU
    (torch 2.13) always, on CUDA (torch 2.11, H200) for a decode step with key padding ("'function'
    object has no attribute 'graph'"). A one-query step costs O(Sk) with a dense bias too, so it
    takes that path; on CUDA longer calls inside a compiled block keep flex (a compiled training
    step ran so).
    """
    if q.shape[-2] != 1:
        raise NotImplementedError(
            "attn_impl 'flex' on CPU inside torch.compile supports one-query decode steps only; "
            "flex compiles itself, so run the model without torch.compile (or use 'auto')"
        )
    wide = torch.promote_types(q.dtype, torch.float32)
    bias = dense_bias(mask, 1, k.shape[-2], alibi_slopes, q.device, wide, q.dtype)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, scale=softmax_scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def _pad_length(x: torch.Tensor, length: int) -> torch.Tensor:
    """(B, H, S, D) -> (B, H, length, D), zero rows appended, contiguous (compiled code is
    specialised to strides too)."""
    return F.pad(x, (0, 0, 0, length - x.shape[-2])).contiguous()


class _FlexWithBlockwiseBackward(torch.autograd.Function):
    """Compiled flex forward; backward recomputed per query block (flex has no CPU backward)."""

    @staticmethod
    def forward(ctx, q, k, v, run, mask, alibi_slopes, softmax_scale):
        out = run(q, k, v).contiguous()
        ctx.save_for_backward(q, k, v, out)
        ctx.rules = (mask, alibi_slopes, softmax_scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out = ctx.saved_tensors
        grad_q, grad_k, grad_v = blockwise_attention_backward(q, k, v, out, grad_out, *ctx.rules)
        return grad_q, grad_k, grad_v, None, None, None, None, None


def blockwise_attention_backward(q, k, v, out, grad_out, mask, alibi_slopes, softmax_scale):
    """Gradients of out = softmax(q k^T * scale + bias) v with respect to q, k, v.

    Recomputes the probabilities for one block of queries at a time (FlashAttention-2's backward,
    in torch ops): O(block x Sk) memory instead of O(Sq x Sk). Query heads are grouped under their
    KV head, so GQA needs no repeated keys and dk, dv come out summed over the group.
    """
    batch, n_heads, num_queries, head_dim = q.shape
    kv_heads, num_keys = k.shape[1], k.shape[2]
    groups = n_heads // kv_heads
    wide = torch.promote_types(q.dtype, torch.float32)
    grad_q = torch.empty_like(q)
    grad_k = torch.zeros(k.shape, dtype=wide, device=k.device)
    grad_v = torch.zeros(v.shape, dtype=wide, device=v.device)
    # Causal without a prefix: a block of queries sees no key after its last query.
    keys_stop_at_queries = mask.causal and mask.prefix is None and isinstance(mask.query_start, int)
    fewest, most = _BACKWARD_ROWS
    rows = min(most, max(fewest, _BACKWARD_BLOCK_SCORES // (batch * n_heads * num_keys)))

    def grouped(x, begin, end):  # (B, H, S, D) rows begin..end -> (B, Hkv, G, rows, D)
        return x[:, :, begin:end].unflatten(1, (kv_heads, groups))

    # Last block first: under a causal mask blocks shrink from there on, so each block's buffers fit
    # in memory the previous one freed (ascending, ever larger buffers fragment the heap: at 32K
    # tokens in bf16 the resident peak was 4.5x higher).
    for begin in reversed(range(0, num_queries, rows)):
        end = min(begin + rows, num_queries)
        keys = min(num_keys, mask.query_start + end) if keys_stop_at_queries else num_keys
        k_block, v_block = k[:, :, None, :keys], v[:, :, None, :keys]  # (B, Hkv, 1, K, D)
        q_block, do_block, out_block = grouped(q, begin, end), grouped(grad_out, begin, end), grouped(out, begin, end)

        # in-place updates below act on fresh matmul outputs: one pass each, no extra copies
        scores = torch.matmul(q_block, k_block.transpose(-1, -2)).to(wide).mul_(softmax_scale)  # (B, Hkv, G, C, K)
        bias = dense_bias(mask.query_block(begin, end, keys), end - begin, keys, alibi_slopes, q.device, wide)
        if bias is not None:  # (B|1, H|1, C, K) -> (B|1, Hkv|1, G|1, C, K)
            scores += bias.unflatten(1, (kv_heads, groups)) if bias.shape[1] == n_heads else bias[:, :, None]
        probs = torch.softmax(scores, dim=-1)
        del scores, bias
        row_dot = (do_block.to(wide) * out_block.to(wide)).sum(-1, keepdim=True)  # (B, Hkv, G, C, 1)
        grad_v[:, :, :keys] += torch.matmul(probs.to(v.dtype).transpose(-1, -2), do_block).sum(2, dtype=wide)
        grad_scores = torch.matmul(do_block, v_block.transpose(-1, -2)).to(wide)
        grad_scores = grad_scores.sub_(row_dot).mul_(probs).mul_(softmax_scale).to(q.dtype)
        del probs
        grad_q[:, :, begin:end] = torch.matmul(grad_scores, k_block).flatten(1, 2)
        grad_k[:, :, :keys] += torch.matmul(grad_scores.transpose(-1, -2), q_block).sum(2, dtype=wide)
    return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype)
