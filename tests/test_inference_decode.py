"""The static-cache decoder against the model's plain path (HF `generate` with a DynamicCache), and
int8 quantization against a float64 dequantized reference. fp32, tiny models."""

from __future__ import annotations

import pytest
import torch

from mptkit.inference.decode import (
    Decoder,
    Int8Linear,
    StaticKVCache,
    enable_compiled_decoding,
    quantize_int8,
    streaming_linear,
)
from mptkit.inference.sampling import SamplingParams
from mptkit.model import MPTConfig, MPTForCausalLM

VOCAB = 256

# Each variant exercises a different branch of the model's attention through the static cache.
VARIANTS = {
    "alibi-torch": {},
    "alibi-sdpa": {"attn_config": {"attn_impl": "sdpa"}},
    "gqa-clip-qkln": {
        "attn_config": {"attn_type": "grouped_query_attention", "kv_n_heads": 2, "clip_qkv": 0.5, "qk_ln": True}
    },
    "mqa-alibi16-6heads": {"d_model": 48, "n_heads": 6, "attn_config": {"attn_type": "multiquery_attention",
                                                                          "alibi_bias_max": 16}},
    "rope-sdpa": {"attn_config": {"alibi": False, "rope": True, "attn_impl": "sdpa"}},
    "learned-pos": {"learned_pos_emb": True, "attn_config": {"alibi": False}},
    "sliding-window": {"attn_config": {"sliding_window_size": 5}},
    "untied-logit-scale-glu": {"tie_word_embeddings": False, "logit_scale": 0.5, "ffn_config": {"ffn_type": "mptglu"}},
}


def tiny_model(seed: int = 0, **overrides) -> MPTForCausalLM:
    # a large init spread so that greedy decoding wanders instead of repeating one token
    overrides.setdefault("init_config", {})
    overrides["init_config"] = {"name": "baseline_", "init_std": 0.35, **overrides["init_config"]}
    config = MPTConfig.from_preset("tiny", vocab_size=VOCAB, max_seq_len=96, **overrides)
    torch.manual_seed(seed)
    return MPTForCausalLM(config).eval()


def plain_greedy(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers' generate on the model's own forward, left-padded like ours."""
    longest = max(map(len, prompts))
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = torch.tensor(prompt)
        mask[row, longest - len(prompt) :] = 1
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, use_cache=True, pad_token_id=0,
        )
    return out[:, longest:].tolist()


def fast_greedy(decoder: Decoder, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    params = [SamplingParams(max_new_tokens=new_tokens)] * len(prompts)
    steps = torch.stack(list(decoder.generate(prompts, params)), dim=1)
    return steps.tolist()


def random_prompts(lengths, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=generator).tolist() for n in lengths]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_equals_plain_path(variant):
    model = tiny_model(**VARIANTS[variant])
    prompts = random_prompts([9, 3, 6])  # a left-padded batch
    expected = plain_greedy(model, prompts, 24)
    assert len(set(sum(expected, []))) > 6  # a non-trivial output
    assert fast_greedy(Decoder(model), prompts, 24) == expected


def test_greedy_batch_rows_equal_single_runs():
    model = tiny_model()
    prompts = random_prompts([5, 11, 2, 8], seed=3)
    decoder = Decoder(model)
    batched = fast_greedy(decoder, prompts, 16)
    assert batched == [fast_greedy(decoder, [p], 16)[0] for p in prompts]


def test_generation_stops_at_the_context_window():
    model = tiny_model()
    prompt = random_prompts([90])[0]
    tokens = fast_greedy(Decoder(model), [prompt], 50)[0]
    assert len(tokens) == model.config.max_seq_len - 90
    assert tokens == plain_greedy(model, [prompt], len(tokens))[0]


def test_prompt_filling_the_context_is_refused():
    decoder = Decoder(tiny_model())
    with pytest.raises(ValueError, match="no room"):
        next(decoder.generate([[5] * 96], [SamplingParams(max_new_tokens=1)]))


def test_compiled_step_matches_and_compiles_once():
    model = tiny_model(attn_config={"attn_impl": "sdpa"})
    prompts = random_prompts([7, 4])
    expected = plain_greedy(model, prompts, 20)
    torch._dynamo.reset()
    decoder = Decoder(model, compile=True)
    # the position moves every step: any recompilation would raise here
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert fast_greedy(decoder, prompts, 20) == expected
        # a new generation of the same shapes reuses the compiled step as well
        assert fast_greedy(decoder, random_prompts([7, 2], seed=5), 20) == plain_greedy(
            model, random_prompts([7, 2], seed=5), 20
        )


def test_int8_linear_equals_dequantized_float64_reference():
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 32), torch.randn(48)
    layer = Int8Linear(weight, bias, torch.float32)
    scales = weight.abs().amax(dim=1) / 127
    # round-to-nearest quantization: every weight within half a step of its int8 value
    assert ((layer.weight.double() * scales[:, None].double() - weight.double()).abs() <= scales[:, None] / 2 + 1e-7).all()
    x = torch.randn(3, 5, 32)
    reference = x.double() @ (layer.weight.double() * scales.double()[:, None]).T + bias.double()
    torch.testing.assert_close(layer(x).double(), reference, rtol=1e-5, atol=1e-5)


def test_int8_model_stays_close_to_the_float_model():
    model = tiny_model(init_config={"init_std": 0.05})
    prompt = random_prompts([12])[0]
    with torch.no_grad():
        reference = model(torch.tensor([prompt])).logits[0, -1]
    quantized = quantize_int8(tiny_model(init_config={"init_std": 0.05}))
    decoder = Decoder(quantized)
    cache = StaticKVCache(quantized, 1, 20)
    tokens = torch.tensor([prompt])
    logits = decoder.prefill(tokens, torch.ones_like(tokens, dtype=torch.bool), cache)[0]
    relative = (logits - reference).norm() / reference.norm()
    assert relative < 0.02, relative


def test_compiled_matrix_vector_products_match_float64():
    """The decode step's bf16 and int8 products, compiled into fused multiply-reduce loops."""
    enable_compiled_decoding()
    torch.manual_seed(5)
    weight, bias = torch.randn(96, 64), torch.randn(96)
    x = torch.randn(1, 1, 64).bfloat16()
    int8 = Int8Linear(weight, bias, torch.bfloat16)
    gelu_then_linear = torch.compile(lambda x, w: streaming_linear(torch.nn.functional.gelu(x), w), fullgraph=True)
    compiled_int8 = torch.compile(int8, fullgraph=True)
    # the compiled product takes the GELU output in fp32 (eager would round it to bf16); its output is bf16
    reference = torch.nn.functional.gelu(x.double()) @ weight.bfloat16().double().T
    torch.testing.assert_close(gelu_then_linear(x, weight.bfloat16()).double(), reference, rtol=1e-2, atol=1e-2)
    dequantized = int8.weight.double() * int8.scales.double()[:, None]
    reference = x.double() @ dequantized.T + bias.bfloat16().double()
    torch.testing.assert_close(compiled_int8(x).double(), reference, rtol=1e-2, atol=2e-2)
