"""Every attention backend against a float64 reference written from the definitions (scaled dot-product
attention; ALiBi's bias -slope * distance, Press et al. 2022).

Forward outputs and the gradients with respect to q, k and v, in fp32 and bf16, across head layouts
(MHA / GQA / MQA, an odd head count), masks (causal, left padding, packed documents, prefix-LM
with symmetric ALiBi, sliding window, a KV cache) and lengths that are not multiples of flex's
128-token block. The slopes of the reference come from the closed form, not from alibi.py.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from mptkit.model import flex_attention as flex_module
from mptkit.model.alibi import alibi_slopes
from mptkit.model.attention import BACKENDS, MaskSpec, attend, choose_backend
from mptkit.model.flash_attention import flash_unsupported_reason

from .naive_mpt import closed_form_slopes

BATCH, HEAD_DIM = 2, 16


def reference_attention(q, k, v, *, slopes, symmetric, scale, query_start=0, causal=True,
                        key_padding=None, sequence_id=None, prefix=None, sliding_window=None):
    """float64 attention, one (batch row, head) at a time, every rule spelled out."""
    q, k, v = q.double(), k.double(), v.double()
    n_heads, num_queries = q.shape[1], q.shape[2]
    kv_heads, num_keys = k.shape[1], k.shape[2]
    i = torch.arange(num_queries)[:, None] + query_start  # query positions among the keys
    j = torch.arange(num_keys)[None, :]
    rows = []
    for b in range(q.shape[0]):
        allowed = torch.ones(num_queries, num_keys, dtype=torch.bool)
        if causal:
            visible = j <= i
            if prefix is not None:  # prefix-LM: the prefix is visible to every query, both ways
                visible = visible | prefix[b][None, :]
            allowed &= visible
        if sliding_window is not None:
            allowed &= (i - j).abs() <= sliding_window
        if key_padding is not None:
            allowed &= key_padding[b][None, :]
        if sequence_id is not None:  # packed documents do not see each other
            allowed &= sequence_id[b][i] == sequence_id[b][j]
        allowed |= i == j  # a token always sees itself (keeps padding rows finite)
        heads = []
        for h in range(n_heads):
            kv = h // (n_heads // kv_heads)
            scores = q[b, h] @ k[b, kv].T * scale
            if slopes is not None:
                distance = (i - j).abs() if symmetric else i - j
                scores = scores - slopes[h] * distance
            scores = scores.masked_fill(~allowed, -math.inf)
            heads.append(torch.softmax(scores, dim=-1) @ v[b, kv])
        rows.append(torch.stack(heads))
    return torch.stack(rows)


def _mask_tensors(case: str, num_keys: int) -> dict:
    """Per-token mask inputs of a case, (BATCH, num_keys) each."""
    rules = {}
    if "padding" in case:
        key_padding = torch.ones(BATCH, num_keys, dtype=torch.bool)
        key_padding[1, :37] = False  # the second row is left-padded
        rules["key_padding"] = key_padding
    if "packed" in case:
        sequence_id = torch.zeros(BATCH, num_keys, dtype=torch.long)
        sequence_id[0, 50:] = 1
        sequence_id[0, 90:] = 2
        sequence_id[1, 64:] = 1  # a document boundary on a block boundary
        rules["sequence_id"] = sequence_id
    if "prefix" in case:
        prefix = torch.zeros(BATCH, num_keys, dtype=torch.bool)
        prefix[0, :70] = True
        prefix[1, :150] = True  # the prefix crosses the 128-token block boundary
        rules["prefix"] = prefix
    if "window" in case:
        rules["sliding_window"] = 17
    return rules


# name: (query heads, kv heads, queries, keys, ALiBi). Lengths 200, 129, 255: not multiples of 128.
CASES = {
    "mha-causal-alibi": (4, 4, 200, 200, True),
    "gqa-left-padding": (4, 2, 200, 200, True),
    "mqa-packed-documents": (4, 1, 129, 129, True),
    "odd-heads-prefix-lm": (3, 3, 255, 255, True),
    "sliding-window": (4, 4, 200, 200, True),
    "no-alibi": (4, 4, 200, 200, False),  # what RoPE and learned positions attend with
    "kv-cache-gqa-padding": (4, 2, 5, 205, True),  # 5 new queries after 200 cached keys
}
BF16_CASES = ["mha-causal-alibi", "gqa-left-padding", "odd-heads-prefix-lm"]


def _flash_skip_reason() -> str | None:
    probe = torch.zeros(1, 1, 1, HEAD_DIM, dtype=torch.bfloat16, device="cuda" if torch.cuda.is_available() else "cpu")
    return flash_unsupported_reason(probe, probe, mask=MaskSpec(), alibi_slopes=None)


BACKEND_PARAMS = [
    "torch",
    "sdpa",
    "flex",
    pytest.param("flash", marks=pytest.mark.skipif(_flash_skip_reason() is not None, reason=str(_flash_skip_reason()))),
]


def _inputs(case: str, dtype):
    n_heads, kv_heads, num_queries, num_keys, alibi = CASES[case]
    generator = torch.Generator().manual_seed(sum(map(ord, case)))
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def tensor(heads, length):
        return torch.randn(BATCH, heads, length, HEAD_DIM, generator=generator).to(device=device, dtype=dtype)

    q, k, v = tensor(n_heads, num_queries), tensor(kv_heads, num_keys), tensor(kv_heads, num_keys)
    rules = {name: (t.to(device) if torch.is_tensor(t) else t) for name, t in _mask_tensors(case, num_keys).items()}
    return q, k, v, rules, num_keys - num_queries, alibi


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.detach().double().cpu() - expected.detach()).abs().max() / expected.detach().abs().max())


@pytest.fixture
def small_backward_blocks(monkeypatch):
    """Make flex's CPU backward take many small query blocks, so block boundaries are exercised."""
    monkeypatch.setattr(flex_module, "_BACKWARD_ROWS", (16, 48))


# fp32: a few ulps of accumulated rounding; bf16: the inputs' own precision (2^-8) over a few steps.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize(
    "case, dtype",
    [(case, torch.float32) for case in CASES] + [(case, torch.bfloat16) for case in BF16_CASES],
    ids=lambda value: str(value).replace("torch.", ""),
)
def test_forward_and_gradients_match_float64_reference(case, dtype, backend, small_backward_blocks):
    q, k, v, rules, query_start, alibi = _inputs(case, dtype)
    n_heads = q.shape[1]
    if backend == "flash" and (reason := flash_unsupported_reason(
        q, k, mask=MaskSpec(query_start=query_start, **rules), alibi_slopes=None
    )):
        pytest.skip(reason)
    symmetric = "prefix" in case
    scale = 1 / math.sqrt(HEAD_DIM)
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    out = attend(
        *inputs,
        impl=backend,
        mask=MaskSpec(query_start=query_start, **rules),
        alibi_slopes=alibi_slopes(n_heads, device=q.device) if alibi else None,
        softmax_scale=scale,
    )
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    grads = torch.autograd.grad(out, inputs, grad_out)

    reference_inputs = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    slopes = torch.tensor(closed_form_slopes(n_heads, 8.0), dtype=torch.float64) if alibi else None
    expected = reference_attention(
        *reference_inputs, slopes=slopes, symmetric=symmetric, scale=scale, query_start=query_start,
        **{name: (t.cpu() if torch.is_tensor(t) else t) for name, t in rules.items()},
    )
    expected_grads = torch.autograd.grad(expected, reference_inputs, grad_out.cpu().double())

    assert out.dtype == dtype and out.shape == q.shape
    tolerance = TOLERANCE[dtype]
    assert _relative_error(out, expected) < tolerance
    for name, grad, expected_grad in zip("qkv", grads, expected_grads):
        assert grad.dtype == dtype and grad.shape == expected_grad.shape, name
        assert _relative_error(grad, expected_grad) < tolerance, name


def test_alibi_in_flex_stays_exact_far_from_the_diagonal_in_bf16():
    """The score_mod adds the bias to fp32 scores from relative positions: at 1,000+ tokens a bf16
    bias (or MPT's key-only form, offset m*S per row) would round off; this stays at bf16 level."""
    q, k, v = (torch.randn(1, 2, 1500, HEAD_DIM, generator=torch.Generator().manual_seed(s)).bfloat16() for s in range(3))
    slopes = alibi_slopes(2, alibi_bias_max=1.0)  # shallow slopes: far keys keep real weight
    out = attend(q, k, v, impl="flex", mask=MaskSpec(), alibi_slopes=slopes, softmax_scale=0.25)
    expected = reference_attention(q, k, v, slopes=slopes.double(), symmetric=False, scale=0.25)
    assert _relative_error(out, expected) < 2e-2


# ---------------------------------------------------------------------------------------------
# O(L) memory, without timing


def _largest_allocation(impl: str, length: int, n_heads: int = 2) -> int:
    """Bytes of the largest single allocation during one forward (torch's memory profiler)."""
    q, k, v = (torch.randn(1, n_heads, length, HEAD_DIM) for _ in range(3))
    slopes = alibi_slopes(n_heads)

    def forward():
        return attend(q, k, v, impl=impl, mask=MaskSpec(), alibi_slopes=slopes, softmax_scale=0.25)

    forward()  # compile outside the measurement
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        forward()  # a fresh MaskSpec: the block mask is built (compiled) inside the measurement too
    return max(event.cpu_memory_usage for event in prof.events())


def test_flex_forward_allocates_o_of_l_while_torch_allocates_h_l_squared():
    n_heads, bytes_per_value = 2, 4
    flex = {length: _largest_allocation("flex", length) for length in (2048, 4096)}
    torch_reference = _largest_allocation("torch", 2048)
    q_bytes = n_heads * 4096 * HEAD_DIM * bytes_per_value
    # flex: nothing bigger than a q-sized tensor, and doubling L doubles it (O(L), not O(L^2))
    assert flex[4096] <= q_bytes
    assert flex[4096] <= 2.2 * flex[2048]
    # torch: the (H, L, L) fp32 score matrix
    assert torch_reference >= n_heads * 2048 * 2048 * bytes_per_value


# ---------------------------------------------------------------------------------------------
# auto


def _auto(num_queries, num_keys, *, alibi=True, dropout_p=0.0, dtype=torch.float32, training=False, **rules):
    q = torch.zeros(1, 4, num_queries, HEAD_DIM, dtype=dtype, requires_grad=training)
    k = torch.zeros(1, 4, num_keys, HEAD_DIM, dtype=dtype)
    return choose_backend(
        q, k, mask=MaskSpec(query_start=num_keys - num_queries, **rules),
        alibi_slopes=alibi_slopes(4) if alibi else None, dropout_p=dropout_p,
    )


def test_auto_choice_on_cpu():
    assert _auto(4096, 4096) == "flex"  # ALiBi at length: O(L) and faster than a dense bias
    assert _auto(4096, 4096, key_padding=torch.ones(1, 4096, dtype=torch.bool), alibi=False) == "flex"
    assert _auto(4096, 4096, dtype=torch.bfloat16) == "flex"
    assert _auto(256, 256) == "sdpa"  # short: a dense bias is cheaper than flex's setup
    # training on CPU: sdpa while its dense bias (here 4 heads x L^2 x 4 bytes) stays <= 256 MiB
    assert _auto(768, 768) == "flex" and _auto(4096, 4096, training=True) == "sdpa"
    assert _auto(8192, 8192, training=True) == "flex"
    assert _auto(1, 8192) == "sdpa"  # one-token decode: the bias is one row per head
    assert _auto(4096, 4096, alibi=False) == "sdpa"  # plain causal: sdpa's fused kernel
    assert _auto(4096, 4096, dropout_p=0.1) == "sdpa"  # flex has no dropout
    assert _auto(4096, 4096, dtype=torch.float64) == "sdpa"  # flex kernels are fp32 / half only


def test_auto_runs_what_it_chooses_and_unknown_names_fail():
    q, k, v, rules, query_start, _ = _inputs("gqa-left-padding", torch.float32)
    mask = MaskSpec(query_start=query_start, **rules)
    slopes = alibi_slopes(q.shape[1], device=q.device)
    chosen = choose_backend(q, k, mask=mask, alibi_slopes=slopes)
    out = attend(q, k, v, impl="auto", mask=mask, alibi_slopes=slopes, softmax_scale=0.25)
    expected = BACKENDS[chosen](q, k, v, mask=mask, alibi_slopes=slopes, softmax_scale=0.25, dropout_p=0.0)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="attn_impl 'magic'.*choose one of"):
        attend(q, k, v, impl="magic", mask=mask, softmax_scale=0.25)


def test_backends_refuse_what_they_cannot_compute():
    q = torch.zeros(1, 2, 8, HEAD_DIM)
    with pytest.raises(NotImplementedError, match="flex.*dropout"):
        attend(q, q, q, impl="flex", mask=MaskSpec(), softmax_scale=0.25, dropout_p=0.1)
    if _flash_skip_reason() is not None:
        with pytest.raises(NotImplementedError, match="flash"):
            attend(q, q, q, impl="flash", mask=MaskSpec(), softmax_scale=0.25)


@pytest.mark.parametrize("length, expected", [(1, 1), (5, 8), (128, 128), (129, 256), (255, 256), (1100, 1280), (2049, 2560), (65536, 65536), (65537, 81920)])
def test_static_lengths_pad_little_and_share_compiled_kernels(length, expected):
    padded = flex_module.static_length(length)
    assert padded == expected
    assert padded - length < flex_module.BLOCK_SIZE or padded <= 1.25 * length


def test_flex_one_query_step_inside_a_callers_compile_matches_reference():
    """A compiled decode step (inference's Decoder) with attn_impl flex: the one-query call is
    traced into the caller's graph (dense O(Sk) path, see flex_attention._inside_callers_compile)."""
    q, k, v, rules, _, _ = _inputs("kv-cache-gqa-padding", torch.float32)
    q = q[:, :, -1:]
    position = torch.tensor([k.shape[2] - 1], device=q.device)  # a tensor, as the static-cache decoder passes
    slopes = alibi_slopes(q.shape[1], device=q.device)

    def step(q, k, v, position):
        mask = MaskSpec(query_start=position, key_padding=rules["key_padding"])
        return attend(q, k, v, impl="flex", mask=mask, alibi_slopes=slopes, softmax_scale=0.25)

    out = torch.compile(step, fullgraph=True)(q, k, v, position)
    expected = reference_attention(q.cpu(), k.cpu(), v.cpu(), slopes=slopes.double().cpu(), symmetric=False, scale=0.25,
                                   query_start=k.shape[2] - 1, key_padding=rules["key_padding"].cpu())
    assert _relative_error(out, expected) < TOLERANCE[torch.float32]


def test_model_files_import_only_torch_and_transformers():
    """Remote code: transformers checks the imports of every file saved beside a checkpoint;
    optional ones (flash_attn, triton) must sit in try blocks, which its checker skips."""
    import importlib.util
    from pathlib import Path

    from transformers.dynamic_module_utils import get_imports

    model_dir = Path(importlib.util.find_spec("mptkit.model").origin).parent
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers"}
    for path in model_dir.glob("*.py"):
        assert set(get_imports(path)) <= allowed, path.name
