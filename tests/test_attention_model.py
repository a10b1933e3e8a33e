"""The attention backends inside the model: logits against the float64 spec model
(tests/naive_mpt.py), parameter gradients against the float64 model on the reference `torch`
backend, and KV-cache decoding with `flex` that compiles once per cache size, not once per token.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch._dynamo.utils import counters

from mptkit.model import MPTConfig, MPTForCausalLM

from .naive_mpt import naive_logits

VOCAB = 320

# Position schemes, head layouts and q/k/v options: each changes what reaches the attention call.
MODEL_CASES = {
    "alibi-gqa-qkln-clip-left-padding": dict(
        attn_config={"attn_type": "grouped_query_attention", "kv_n_heads": 2, "qk_ln": True, "clip_qkv": 0.5}
    ),
    "rope-packed-documents": dict(attn_config={"alibi": False, "rope": True, "attn_uses_sequence_id": True}),
    "learned-positions-mqa-6-heads-left-padding": dict(
        n_heads=6, d_model=48, learned_pos_emb=True, attn_config={"alibi": False, "attn_type": "multiquery_attention"}
    ),
    "alibi-prefix-lm": dict(attn_config={"prefix_lm": True, "alibi_bias_max": 16}),
}


def build(case: str, attn_impl: str, dtype=torch.float32) -> MPTForCausalLM:
    fields = dict(MODEL_CASES[case])
    fields["attn_config"] = {**fields.get("attn_config", {}), "attn_impl": attn_impl}
    config = MPTConfig.from_preset("tiny", vocab_size=VOCAB, max_seq_len=64, **fields)
    torch.manual_seed(0)
    model = MPTForCausalLM(config)
    with torch.no_grad():  # non-trivial norm weights, so a misplaced qk_ln shows
        for name, param in model.named_parameters():
            if "_ln" in name or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model.to(dtype)


def model_inputs(case: str, length: int = 40) -> dict:
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, length))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "left-padding" in case:
        inputs["attention_mask"][1, :9] = 0
    if "packed" in case:
        sequence_id = torch.zeros_like(ids)
        sequence_id[0, 15:] = 1
        sequence_id[1, 7:] = 1
        sequence_id[1, 30:] = 2
        inputs["sequence_id"] = sequence_id
    if "prefix" in case:
        prefix_mask = torch.zeros_like(ids)
        prefix_mask[0, :12] = 1
        prefix_mask[1, :25] = 1
        inputs["prefix_mask"] = prefix_mask
    return inputs


def _relative_error(actual, expected) -> float:
    return float((actual.detach().double() - expected.detach().double()).abs().max() / expected.detach().abs().max())


def _loss_weights(shape) -> torch.Tensor:
    return torch.randn(*shape, VOCAB, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


@functools.cache
def float64_reference(case: str):
    """Logits and parameter gradients of the float64 model on the `torch` backend, after checking
    its logits against the spec's float64 model (computed once per case, shared by the backends)."""
    reference = build(case, "torch", torch.float64)
    inputs = model_inputs(case)
    real = inputs["attention_mask"].bool()
    logits = reference(**inputs).logits
    spec = naive_logits(
        reference.config, reference.state_dict(), inputs["input_ids"], inputs["attention_mask"],
        sequence_id=inputs.get("sequence_id"), prefix_mask=inputs.get("prefix_mask"),
    )
    assert _relative_error(logits[real], spec[real]) < 1e-10
    (logits[real] * _loss_weights(real.shape)[real]).sum().backward()
    return logits.detach(), [param.grad for param in reference.parameters()]


@pytest.mark.parametrize("attn_impl", ["flex", "sdpa"])
@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_model_logits_and_gradients_match_float64(case, attn_impl):
    model = build(case, attn_impl)
    inputs = model_inputs(case)
    real = inputs["attention_mask"].bool()
    expected_logits, expected_grads = float64_reference(case)

    logits = model(**inputs).logits
    assert _relative_error(logits[real], expected_logits[real]) < 2e-5
    (logits[real] * _loss_weights(real.shape)[real].float()).sum().backward()
    for (name, param), expected_grad in zip(model.named_parameters(), expected_grads):
        assert _relative_error(param.grad, expected_grad) < 1e-4, name


def test_bf16_model_with_flex_stays_within_bf16_error():
    case = "alibi-gqa-qkln-clip-left-padding"
    model = build(case, "flex", torch.bfloat16)
    reference = build(case, "torch", torch.float64)
    inputs = model_inputs(case)
    real = inputs["attention_mask"].bool()
    # the same (bf16-rounded) weights in both: the error is that of bf16 activations
    reference.load_state_dict({name: value.double() for name, value in model.state_dict().items()})
    logits = model(**inputs).logits
    expected = reference(**inputs).logits
    assert logits.dtype == torch.bfloat16
    assert _relative_error(logits[real], expected[real]) < 3e-2
    logits[real].float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("attn_impl", ["torch", "sdpa"])
def test_dense_bias_is_built_once_per_forward_not_per_layer(attn_impl, monkeypatch):
    from mptkit.model import attention_masks

    builds = []
    build_dense_bias = attention_masks._build_dense_bias
    monkeypatch.setattr(attention_masks, "_build_dense_bias", lambda *a: builds.append(1) or build_dense_bias(*a))
    case = "alibi-gqa-qkln-clip-left-padding"
    model = build(case, attn_impl)
    assert model.config.n_layers > 1
    model(**model_inputs(case))
    assert len(builds) == 1


def _compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_flex_kv_cache_decoding_matches_full_forward_and_compiles_once_per_cache_size():
    model = build("alibi-gqa-qkln-clip-left-padding", "flex").eval()
    inputs = model_inputs("alibi-gqa-qkln-clip-left-padding", length=40)
    ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    prompt = 20
    with torch.no_grad():
        full = model(ids, attention_mask=attention_mask).logits
        out = model(ids[:, :prompt], attention_mask=attention_mask[:, :prompt], use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        new_graphs = {}  # keys in the cache after the step -> graphs compiled by that step
        for position in range(prompt, ids.shape[1]):
            before = _compiled_graphs()
            out = model(
                ids[:, position : position + 1],
                attention_mask=attention_mask[:, : position + 1],
                cache=cache,
                use_cache=True,
            )
            new_graphs[position + 1] = _compiled_graphs() - before
            torch.testing.assert_close(out.logits[:, 0], full[:, position], rtol=1e-4, atol=1e-4)
    # keys 21..32 share the padded size 32, keys 33..40 the size 64: only the first step into each
    # size may compile (its block mask and its kernel), every other step runs compiled code.
    assert sum(new_graphs[n] for n in range(22, 33)) == 0
    assert sum(new_graphs[n] for n in range(34, 41)) == 0
    assert 1 <= new_graphs[21] <= 2 and 1 <= new_graphs[33] <= 2
