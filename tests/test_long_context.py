"""Long context: a model loaded with a raised max_seq_len prefills thousands of tokens with `auto`
(flex on this CPU) in memory that grows linearly, matches a dense chunked computation, and then
generates. The full 65,536-token run of the mpt-125m shape is benchmarks/long_context.py
(docs/long_context.md); the `slow` test runs 65,536 tokens with the tiny shape.
"""

from __future__ import annotations

import ctypes
import gc
import re
import sys
from pathlib import Path

import pytest
import torch

from mptkit.model import MPTConfig, MPTForCausalLM
from mptkit.model.alibi import alibi_slopes
from mptkit.model.attention import MaskSpec, attend, choose_backend

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux /proc memory counters")

TRAINED_LENGTH = 256
GREEDY_STEPS = 8  # generated after each long prefill and compared with the dense reference


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A tiny ALiBi MPT saved in HF format with max_seq_len=256, attn_impl auto."""
    directory = tmp_path_factory.mktemp("tiny-mpt")
    config = MPTConfig.from_preset("tiny", vocab_size=512, max_seq_len=TRAINED_LENGTH, attn_config={"attn_impl": "auto"})
    torch.manual_seed(0)
    MPTForCausalLM(config).save_pretrained(directory)
    return directory


def load(directory: Path, max_seq_len: int) -> MPTForCausalLM:
    model = MPTForCausalLM.from_pretrained(directory, max_seq_len=max_seq_len).eval()
    assert model.config.max_seq_len == max_seq_len
    return model


def _rss(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _peak_memory_of(run) -> int:
    """Bytes of resident memory `run()` adds at its peak (VmHWM reset just before)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _rss("VmRSS")
    run()
    return _rss("VmHWM") - baseline


def _compile_attention_for(model: MPTForCausalLM, length: int) -> None:
    """Run the model's attention once at this length, so compilation is not measured."""
    config = model.config
    q = torch.randn(1, config.n_heads, length, config.head_dim)
    k = torch.randn(1, config.kv_n_heads, length, config.head_dim)
    attend(q, k, k, impl="auto", mask=MaskSpec(), alibi_slopes=alibi_slopes(config.n_heads), softmax_scale=0.25)


def _prefill(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=True, logits_to_keep=1)


def _dense_chunked_reference(model, ids, chunk: int, steps: int) -> tuple[list[int], torch.Tensor]:
    """The `steps` greedy tokens after `ids` and their (steps, vocab) logits (row 0: the last prompt
    position), computed with the plain `torch` backend (dense scores and bias): the prompt `chunk`
    queries at a time over the KV cache, so memory is bounded by chunk x length per head, then one
    cached step per token. Independent of flex (the prefill under test) and of sdpa (`auto`'s
    decode steps)."""
    for block in model.transformer.blocks:
        block.attn.attn_impl = "torch"
    try:
        cache = None
        with torch.no_grad():
            for start in range(0, ids.shape[1], chunk):
                out = model(ids[:, start : start + chunk], cache=cache, use_cache=True, logits_to_keep=1)
                cache = out.cache if hasattr(out, "cache") else out.past_key_values
            return _greedy_continuation(model, out, steps)
    finally:
        for block in model.transformer.blocks:
            block.attn.attn_impl = "auto"


def test_8k_prefill_in_linear_memory_matches_dense_chunks_then_generates(saved_model):
    length = 8192
    model = load(saved_model, max_seq_len=length + 8)
    config = model.config
    ids = torch.randint(2, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(1))
    q = torch.zeros(1, config.n_heads, length, config.head_dim)
    assert choose_backend(q, q, mask=MaskSpec(), alibi_slopes=alibi_slopes(config.n_heads)) == "flex"

    peaks, outputs = {}, {}
    for n in (length // 2, length):
        _compile_attention_for(model, n)
        peaks[n] = _peak_memory_of(lambda: outputs.update({n: _prefill(model, ids[:, :n])}))
    # One dense (H, L, L) fp32 score matrix at 8K is 1 GiB; the flex prefill stays far below (70 MB
    # alone, up to 110 MB measured inside the full suite, whose earlier tests leave the heap
    # fragmented), and doubling the length at most doubles it (plus allocator slack), where scores
    # would quadruple.
    dense_scores = config.n_heads * length * length * 4
    assert peaks[length] < dense_scores / 4
    assert peaks[length] < 2.5 * peaks[length // 2] + 16 * 2**20

    out = outputs[length]
    reference = _dense_chunked_reference(model, ids, chunk=1024, steps=GREEDY_STEPS)
    expected = reference[1][0]  # the reference's last prompt position
    torch.testing.assert_close(out.logits[0, -1], expected, rtol=1e-4, atol=1e-4)
    _assert_same_continuation(model, out, reference)


def _greedy_continuation(model, prefill_output, steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens after a prefill, one cached step each with the model's attn_impl (auto: sdpa
    with a one-row bias), and the (steps, vocab) logits each token was taken from."""
    out, tokens, logits = prefill_output, [], []
    with torch.no_grad():
        for _ in range(steps):
            logits.append(out.logits[0, -1])
            assert torch.isfinite(logits[-1]).all()
            tokens.append(int(logits[-1].argmax()))
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            out = model(torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True)
    return tokens, torch.stack(logits)


def _assert_same_continuation(model, prefill_output, reference) -> None:
    """The greedy continuation of `prefill_output` (auto decode) is the reference's, token for
    token, and so are the logits they were chosen from (a repeated token cannot hide a drift)."""
    expected_tokens, expected_logits = reference
    tokens, logits = _greedy_continuation(model, prefill_output, steps=len(expected_tokens))
    assert tokens == expected_tokens
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_65k_prefill_and_generation_in_linear_memory(saved_model):
    length = 65536
    model = load(saved_model, max_seq_len=length + 8)
    ids = torch.randint(2, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(2))
    peaks, outputs = {}, {}
    for n in (length // 4, length):
        _compile_attention_for(model, n)
        peaks[n] = _peak_memory_of(lambda: outputs.update({n: _prefill(model, ids[:, :n])}))
    assert peaks[length] < 5 * peaks[length // 4] + 64 * 2**20  # linear (x4 the length), not x16
    assert peaks[length] < 2 * 2**30
    # The reference costs time quadratic in the length (dense scores; ~16 s at 8K on 2 cores).
    _assert_same_continuation(model, outputs[length], _dense_chunked_reference(model, ids, chunk=256, steps=GREEDY_STEPS))
