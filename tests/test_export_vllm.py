"""An HF export satisfies what vLLM's MPT loader reads and asserts (no vLLM needed).

From vLLM's `vllm/model_executor/models/mpt.py` (commit 02d799bc of vllm-project/vllm), which takes
the config object `AutoConfig.from_pretrained(model, trust_remote_code=...)` returns
(`vllm/transformers_utils/config.py`, HFConfigParser; "mpt" is not in vLLM's own config registry):
- `MPTForCausalLM`/`MptForCausalLM` are its architecture names; it asserts `tie_word_embeddings`
  (its lm_head is wte, so no lm_head weights), `embedding_fraction == 1.0`,
  `norm_type == "low_precision_layernorm"`, `not attn_config.prefix_lm`, `attn_config.alibi`;
- it reads d_model, n_heads, n_layers, vocab_size, no_bias (drops every bias, LayerNorm's too),
  expansion_ratio (FFN width expansion_ratio * d_model, a layer size: an int),
  attn_config.clip_qkv, .qk_ln, .alibi_bias_max, and attn_config.kv_n_heads when the key is
  present (`"kv_n_heads" in config.attn_config`), compared with the tensor-parallel size (an int);
- it assumes what it does not read: LayerNorm eps 1e-5, softmax scale 1/sqrt(head_dim), exact GELU
  up -> down (no gate), no logit scale, q/k LayerNorms over d_model each (so qk_ln needs
  multi-head attention), no sliding window.
"""

from __future__ import annotations

import json
import math

import pytest
from safetensors import safe_open
from transformers import AutoConfig

from mptkit.data.tokenizer import load_tokenizer
from mptkit.export.hf import export_hf
from mptkit.model import MPTConfig, MPTForCausalLM

VLLM_ARCHITECTURES = {"MPTForCausalLM", "MptForCausalLM"}


def vllm_mpt_problems(config) -> list[str]:
    """What vLLM's MPT loader would assert on, fail on, or silently compute differently, for the
    config object it gets (attribute reads, as vLLM does them)."""
    problems = []
    try:
        attn = config.attn_config
        reads = {name: getattr(attn, name) for name in ("clip_qkv", "qk_ln", "alibi_bias_max", "prefix_lm", "alibi")}
        kv_heads = attn.kv_n_heads if "kv_n_heads" in attn else config.n_heads
    except AttributeError as exc:
        return [f"attn_config: vLLM reads it by attribute: {exc}"]
    if reads["prefix_lm"] or not reads["alibi"]:
        problems.append(f"asserts attn_config.alibi and not prefix_lm, got alibi={reads['alibi']} "
                        f"prefix_lm={reads['prefix_lm']}")
    if not isinstance(kv_heads, int) or isinstance(kv_heads, bool):
        problems.append(f"attn_config.kv_n_heads={kv_heads!r}: present, so vLLM compares it with the TP size "
                        "(needs an int)")
    elif reads["qk_ln"] and kv_heads != config.n_heads:
        problems.append("qk_ln with kv_n_heads < n_heads: vLLM's k_ln spans d_model")
    if not isinstance(config.expansion_ratio, int):
        problems.append(f"expansion_ratio={config.expansion_ratio!r}: vLLM's FFN width expansion_ratio * d_model "
                        "must be an int")
    if config.embedding_fraction != 1.0:
        problems.append(f"asserts embedding_fraction == 1.0, got {config.embedding_fraction}")
    if config.norm_type != "low_precision_layernorm":
        problems.append(f"asserts norm_type == 'low_precision_layernorm', got {config.norm_type!r}")
    if not config.tie_word_embeddings:
        problems.append("asserts tie_word_embeddings")
    if not set(getattr(config, "architectures", None) or []) & VLLM_ARCHITECTURES:
        problems.append(f"architectures {config.architectures!r}: not a vLLM MPT name")
    # what vLLM assumes without reading it
    assumed = {
        "layer_norm_epsilon": (getattr(config, "layer_norm_epsilon", 1e-5), 1e-5),
        "logit_scale": (getattr(config, "logit_scale", None), None),
        "attn_config.softmax_scale": (getattr(attn, "softmax_scale", None), None),
    }
    for name, (value, expected) in assumed.items():
        if not (value == expected or (value is not None and expected is not None and math.isclose(value, expected))):
            problems.append(f"{name}={value!r}: vLLM assumes {expected!r}")
    return problems


def vllm_weight_shapes(config) -> dict[str, tuple[int, ...]]:
    """The parameters vLLM's MPTForCausalLM loads by name (its modules mirror the hub names)."""
    d, heads = config.d_model, config.n_heads
    kv_heads = config.attn_config.kv_n_heads if "kv_n_heads" in config.attn_config else heads
    head_dim, ffn = d // heads, config.expansion_ratio * d
    shapes = {"transformer.wte.weight": (config.vocab_size, d), "transformer.norm_f.weight": (d,)}
    for i in range(config.n_layers):
        block = f"transformer.blocks.{i}."
        shapes.update({block + "norm_1.weight": (d,),
                       block + "attn.Wqkv.weight": ((heads + 2 * kv_heads) * head_dim, d),
                       block + "attn.out_proj.weight": (d, d), block + "norm_2.weight": (d,),
                       block + "ffn.up_proj.weight": (ffn, d), block + "ffn.down_proj.weight": (d, ffn)})
    return shapes


def export(tmp_path, **fields) -> str:
    """An HF export as `mptkit export` writes it, of a tiny model with these config fields."""
    config = MPTConfig.from_preset("tiny", **fields)
    MPTForCausalLM(config).save_pretrained(tmp_path / "model", tokenizer=load_tokenizer())
    export_hf(tmp_path / "model", tmp_path / "export")
    return str(tmp_path / "export")


# The hub's configs shrunk to the tiny shape: MPT-7B (the defaults) and StoryWriter as a user writes
# it in YAML (integers where the hub has floats).
CASES = {"mpt-7b": {}, "storywriter-yaml": {"attn_config": {"clip_qkv": 6, "alibi_bias_max": 16}}}


@pytest.mark.parametrize("case", CASES)
def test_export_config_satisfies_vllms_mpt_loader(tmp_path, case):
    """vLLM without trust_remote_code: transformers' own (strict) MptConfig reads config.json."""
    directory = export(tmp_path, **CASES[case])
    config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    assert vllm_mpt_problems(config) == []


@pytest.mark.parametrize("case", CASES)
def test_export_config_satisfies_vllms_mpt_loader_but_kv_n_heads(tmp_path, case):
    """Every other read and assertion holds already; the weights are what vLLM loads by name."""
    directory = export(tmp_path, **CASES[case])
    config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    assert [p for p in vllm_mpt_problems(config) if not p.startswith("attn_config.kv_n_heads")] == []
    if CASES[case]:
        assert (config.attn_config.clip_qkv, config.attn_config.alibi_bias_max) == (6.0, 16)
    stored = json.loads((tmp_path / "export" / "config.json").read_text())
    config.attn_config.kv_n_heads = stored["attn_config"]["kv_n_heads"] or stored["n_heads"]
    with safe_open(tmp_path / "export" / "model.safetensors", "pt") as weights:
        shapes = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
    assert shapes == vllm_weight_shapes(config)


@pytest.mark.xfail(strict=True, reason="with trust_remote_code=True AutoConfig returns mptkit's MPTConfig, whose "
                                       "attn_config is a dict; vLLM reads config.attn_config.clip_qkv by attribute")
def test_export_config_satisfies_vllm_with_trust_remote_code(tmp_path):
    config = AutoConfig.from_pretrained(export(tmp_path), trust_remote_code=True)
    assert vllm_mpt_problems(config) == []


@pytest.mark.parametrize("fields, problem", [
    ({"norm_type": "layernorm"}, "norm_type"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings"),
    ({"expansion_ratio": 2.5}, "expansion_ratio"),
    ({"attn_config": {"alibi": False}}, "attn_config.alibi"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
])
def test_the_check_sees_configs_vllm_would_refuse_or_misread(fields, problem):
    config = MPTConfig.from_preset("tiny", **fields)
    config.architectures = ["MPTForCausalLM"]
    attn = dict(config.attn_config, kv_n_heads=config.n_heads)
    config.attn_config = type("AttnConfig", (), {**attn, "__contains__": lambda self, key: key in attn})()
    assert any(problem in p for p in vllm_mpt_problems(config)), vllm_mpt_problems(config)
