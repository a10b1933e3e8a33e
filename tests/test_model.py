"""The MPT model core against independent references: closed-form ALiBi slopes, transformers' own
MptForCausalLM, and a float64 implementation written from the spec (tests/naive_mpt.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import MptConfig, MptForCausalLM
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from mptkit.model import ConfigError, MPTConfig, MPTForCausalLM
from mptkit.model.alibi import alibi_slopes

from .hub_checkpoints import HUB_MPT7B_FIELDS
from .naive_mpt import closed_form_slopes, naive_logits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_FILE = os.path.join(REPO, "mptkit", "assets", "gpt-neox-20b-tokenizer.json")
VOCAB = 320


def tiny(**overrides) -> MPTConfig:
    fields = dict(vocab_size=VOCAB, max_seq_len=64, attn_config={"attn_impl": "torch"})
    fields.update(overrides)
    return MPTConfig.from_preset("tiny", **fields)


def build(config: MPTConfig, seed: int = 0, dtype=torch.float32) -> MPTForCausalLM:
    torch.manual_seed(seed)
    model = MPTForCausalLM(config).to(dtype).eval()
    # Non-trivial norm weights/biases so that a dropped or misplaced norm parameter shows.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "_ln" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def hf_twin(model: MPTForCausalLM) -> MptForCausalLM:
    """transformers' MPT with the same weights (only for configs it supports)."""
    c = model.config
    hf_config = MptConfig(
        d_model=c.d_model,
        n_heads=c.n_heads,
        n_layers=c.n_layers,
        vocab_size=c.vocab_size,
        max_seq_len=c.max_seq_len,
        expansion_ratio=c.expansion_ratio,
        attn_config={"clip_qkv": c.attn.clip_qkv, "alibi_bias_max": int(c.attn.alibi_bias_max)},
    )
    twin = MptForCausalLM(hf_config).eval()
    missing, unexpected = twin.load_state_dict(model.state_dict(), strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to wte in transformers
    twin.tie_weights()
    return twin


# ---------------------------------------------------------------------------------------------
# ALiBi slopes


@pytest.mark.parametrize("bias_max", [8, 16])
def test_alibi_slopes_equal_closed_form_for_1_to_64_heads(bias_max):
    for n_heads in range(1, 65):
        expected = torch.tensor(closed_form_slopes(n_heads, bias_max), dtype=torch.float64)
        torch.testing.assert_close(alibi_slopes(n_heads, bias_max).double(), expected, rtol=1e-6, atol=0)


def test_alibi_slopes_worked_examples_from_the_spec():
    twelve = [2.0**-k for k in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    assert alibi_slopes(12, 8).tolist() == pytest.approx(twelve, rel=1e-6)
    assert alibi_slopes(32, 8).tolist() == pytest.approx([2.0 ** (-k / 4) for k in range(1, 33)], rel=1e-6)
    assert alibi_slopes(8, 8).tolist() == pytest.approx([2.0**-k for k in range(1, 9)], rel=1e-6)


def test_alibi_slopes_match_transformers():
    for n_heads in (1, 3, 6, 12, 32, 48):
        # transformers returns slope * (j - (S-1)); at S=2 the first column is -slope
        theirs = -build_mpt_alibi_tensor(n_heads, 2, alibi_bias_max=8)[:, 0, 0]
        torch.testing.assert_close(alibi_slopes(n_heads, 8), theirs.float(), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# Config


def test_hub_config_json_loads_unchanged_and_matches_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HUB_MPT7B_FIELDS))
    config = MPTConfig.from_pretrained(tmp_path)
    for key, value in HUB_MPT7B_FIELDS["attn_config"].items():
        assert config.attn_config[key] == value
    assert (config.d_model, config.n_heads, config.n_layers, config.vocab_size) == (4096, 32, 32, 50432)
    assert config.attn.alibi and not config.uses_learned_positions  # learned_pos_emb is inert with ALiBi
    preset = MPTConfig.from_preset("mpt-7b")
    for key in ("d_model", "n_heads", "n_layers", "vocab_size", "max_seq_len", "expansion_ratio", "norm_type"):
        assert getattr(preset, key) == getattr(config, key)
    assert preset.attn == config.attn


def test_storywriter_preset_and_max_seq_len_override():
    story = MPTConfig.from_preset("mpt-7b-storywriter")
    assert (story.max_seq_len, story.attn.alibi_bias_max, story.attn.clip_qkv) == (65536, 16, 6)
    assert MPTConfig.from_preset("mpt-7b-storywriter", max_seq_len=83968).max_seq_len == 83968


def test_mpt_7b_on_meta_has_the_published_parameter_count():
    with torch.device("meta"):
        model = MPTForCausalLM(MPTConfig.from_preset("mpt-7b"))
    assert sum(p.numel() for p in model.parameters()) == 6_649_286_656
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(d_model=100, n_heads=3), "d_model"),
        (dict(attn_config={"attn_type": "grouped_query_attention", "kv_n_heads": 3}), "kv_n_heads"),
        (dict(attn_config={"attn_type": "grouped_query_attention"}), "kv_n_heads"),
        (dict(attn_config={"attn_type": "sparse"}), "attn_type"),
        (dict(attn_config={"attn_impl": "magic"}), "attn_impl"),
        (dict(norm_type="batchnorm"), "norm_type"),
        (dict(attn_config={"alibi": True, "rope": True}), "rope"),
        (dict(attn_config={"alibbi": True}), "alibbi"),
        (dict(attn_config={"clip_qkv": -1}), "clip_qkv"),
        (dict(ffn_config={"ffn_type": "moe"}), "ffn_type"),
        (dict(logit_scale="huge"), "logit_scale"),
        (dict(init_config={"name": "orthogonal_"}), "init_config.name"),
        (dict(n_layers=0), "n_layers"),
        (dict(resid_pdrop=1.5), "resid_pdrop"),
    ],
)
def test_invalid_configs_fail_at_construction_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        MPTConfig.from_preset("tiny", **overrides)


def test_unknown_attn_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'alibi'"):
        MPTConfig.from_preset("tiny", attn_config={"alibbi": True})


def test_unknown_preset_lists_choices():
    with pytest.raises(KeyError, match="mpt-7b"):
        MPTConfig.from_preset("mpt-8b")


def test_config_error_carries_the_dotted_field_and_the_message_apart():
    with pytest.raises(ConfigError) as info:
        MPTConfig.from_preset("tiny", attn_config={"alibi_bias_max": -1})
    error = info.value
    assert (error.field, error.message) == ("attn_config.alibi_bias_max", "expected > 0, got -1")
    assert str(error) == "MPTConfig.attn_config.alibi_bias_max: expected > 0, got -1"
    with pytest.raises(ConfigError) as info:
        MPTConfig.from_preset("tiny", attn_config={"alibbi": True})
    assert info.value.field == "attn_config.alibbi" and str(info.value).startswith("MPTConfig.attn_config.alibbi: ")
    import pickle

    assert str(pickle.loads(pickle.dumps(error))) == str(error)  # errors cross process boundaries intact


def test_one_merge_of_config_fields_for_presets_and_overrides():
    from mptkit.model.configuration_mpt import merge_config_fields
    from mptkit.model.presets import PRESETS

    base = {"d_model": 64, "attn_config": {"alibi": True, "clip_qkv": 6}, "init_config": {"init_std": 0.02}}
    merged = merge_config_fields(base, {"d_model": 128, "attn_config": {"clip_qkv": None}, "init_config": None})
    assert merged == {"d_model": 128, "attn_config": {"alibi": True, "clip_qkv": None}, "init_config": {"init_std": 0.02}}
    assert base["attn_config"] == {"alibi": True, "clip_qkv": 6}  # the inputs are not changed
    with pytest.raises(ConfigError, match="attn_config: expected a mapping"):
        merge_config_fields(base, {"attn_config": [1]})
    # Presets are built by the same merge; from_preset merges its overrides into a preset's dicts.
    story = MPTConfig.from_preset("mpt-7b-storywriter", attn_config={"clip_qkv": 8})
    assert (story.attn.alibi, story.attn.alibi_bias_max, story.attn.clip_qkv) == (True, 16, 8)
    assert PRESETS["tiny"]["attn_config"] == {"alibi": True} and PRESETS["tiny"]["max_seq_len"] == 256


def test_field_values_are_stored_in_the_types_transformers_validates():
    config = MPTConfig(d_model=64, n_heads=4, n_layers=2)
    assert type(config.attn_config["alibi_bias_max"]) is int and type(config.attn_config["attn_pdrop"]) is int
    config = MPTConfig(d_model=64.0, n_heads=4, n_layers=2, expansion_ratio=4.0, layer_norm_epsilon="1e-6",
                       embedding_fraction=1, logit_scale=2, resid_pdrop=0,
                       attn_config={"alibi_bias_max": 16.0, "clip_qkv": 6, "softmax_scale": 1, "attn_pdrop": 0.0,
                                    "kv_n_heads": 2.0, "sliding_window_size": 8.0, "rope_theta": 500})
    typed = {name: type(getattr(config, name)) for name in ("d_model", "expansion_ratio", "layer_norm_epsilon",
                                                             "embedding_fraction", "logit_scale", "resid_pdrop")}
    assert typed == {"d_model": int, "expansion_ratio": int, "layer_norm_epsilon": float,
                     "embedding_fraction": float, "logit_scale": float, "resid_pdrop": float}
    attn = {name: type(value) for name, value in config.attn_config.items() if name in (
        "alibi_bias_max", "clip_qkv", "softmax_scale", "attn_pdrop", "kv_n_heads", "sliding_window_size", "rope_theta")}
    assert attn == {"alibi_bias_max": int, "clip_qkv": float, "softmax_scale": float, "attn_pdrop": int,
                    "kv_n_heads": int, "sliding_window_size": int, "rope_theta": float}
    assert config.layer_norm_epsilon == 1e-6 and config.attn.alibi_bias_max == 16
    # Genuinely fractional values stay valid for mptkit's own code.
    fractional = MPTConfig(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2.5,
                           attn_config={"alibi": True, "alibi_bias_max": 12.5, "attn_pdrop": 0.1})
    assert (fractional.expansion_ratio, fractional.attn.alibi_bias_max, fractional.attn.attn_pdrop) == (2.5, 12.5, 0.1)
    assert MPTConfig.from_dict(fractional.to_dict()).attn == fractional.attn


# ---------------------------------------------------------------------------------------------
# Against transformers' MptForCausalLM


@pytest.mark.parametrize("attn_impl", ["torch", "sdpa"])
@pytest.mark.parametrize("clip_qkv", [None, 0.5])
def test_logits_and_greedy_match_transformers(attn_impl, clip_qkv):
    model = build(tiny(attn_config={"attn_impl": attn_impl, "clip_qkv": clip_qkv}, n_heads=6, d_model=96))
    twin = hf_twin(model)
    ids = torch.randint(0, VOCAB, (3, 37))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, twin(ids).logits, rtol=0, atol=1e-5)
    ours = model.generate(ids[:1], max_new_tokens=12, do_sample=False)
    theirs = twin.generate(ids[:1], max_new_tokens=12, do_sample=False)
    assert ours.tolist() == theirs.tolist()


def test_checkpoints_interoperate_with_transformers_both_ways(tmp_path):
    model = build(tiny())
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        reference = model(ids).logits
    model.save_pretrained(tmp_path / "ours")
    theirs = MptForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, reference, rtol=0, atol=1e-5)
    assert theirs.generate(ids[:1], max_new_tokens=8, do_sample=False).tolist() == model.generate(
        ids[:1], max_new_tokens=8, do_sample=False
    ).tolist()

    theirs.save_pretrained(tmp_path / "theirs")
    back = MPTForCausalLM.from_pretrained(tmp_path / "theirs").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, reference, rtol=0, atol=1e-5)


def test_saving_warns_about_features_transformers_mpt_ignores(tmp_path):
    model = build(tiny(attn_config={"attn_type": "grouped_query_attention", "kv_n_heads": 2, "qk_ln": True}))
    with pytest.warns(UserWarning, match="kv_n_heads=2.*qk_ln"):
        model.save_pretrained(tmp_path)


# Every optional field that stock MptForCausalLM implements, written as a user writes YAML: whole
# numbers without a dot, `8.0` for an int field, `1e-6` (a string to YAML 1.1).
STOCK_FEATURES_YAML = """
d_model: 96
n_heads: 6
n_layers: 2
vocab_size: 320
max_seq_len: 64
expansion_ratio: 4.0
layer_norm_epsilon: 1e-6
norm_type: layernorm
no_bias: true
learned_pos_emb: true
embedding_fraction: 1
resid_pdrop: 0
emb_pdrop: 0
logit_scale: null
attn_config:
  attn_type: multihead_attention
  attn_impl: sdpa
  alibi: true
  alibi_bias_max: 8.0
  clip_qkv: 1
  softmax_scale: 0.25
  attn_pdrop: 0.0
init_config:
  init_std: 0.02
  init_gain: 0
  emb_init_std: 0.01
"""

# Features stock MptForCausalLM does not run: its config must still load without remote code.
UNSUPPORTED_FEATURES_YAML = {
    "mqa-qkln-bias16-logitscale-glu-rmsnorm-bias-untied-prefix": """
attn_config: {alibi: true, alibi_bias_max: 16, attn_type: multiquery_attention, qk_ln: true, clip_qkv: 6,
              prefix_lm: true, attn_uses_sequence_id: true, sliding_window_size: 16.0, attn_pdrop: 0}
ffn_config: {ffn_type: mptglu, ffn_hidden_size: 200.0}
logit_scale: 2
norm_type: rmsnorm
no_bias: false
tie_word_embeddings: false
embedding_fraction: 0.5
resid_pdrop: 0.1
emb_pdrop: 0
init_config: {init_div_is_residual: 2, emb_init_uniform_lim: [-0.1, 0.1]}
""",
    "rope": "attn_config: {alibi: false, rope: true, rope_theta: 500}\nlogit_scale: inv_sqrt_d_model\n",
    "learned-positions": "attn_config: {alibi: false}\nexpansion_ratio: 3.0\n",
}


def _fields(config: MPTConfig) -> dict:
    """The model's fields of a config (without where it was loaded from or what saved it)."""
    bookkeeping = {"_name_or_path", "architectures", "auto_map", "transformers_version"}
    return {key: value for key, value in config.to_dict().items() if key not in bookkeeping}


def _stock_twin_of(model: MPTForCausalLM, directory) -> MptForCausalLM:
    """Save with mptkit, load with stock transformers (no remote code), as `mptkit generate` would."""
    model.save_pretrained(directory)
    return MptForCausalLM.from_pretrained(directory, trust_remote_code=False).eval()


def test_a_default_config_checkpoint_loads_in_stock_transformers(tmp_path):
    # MPTConfig's defaults at a toy size (learned positions, so stock MPT loads it but cannot run it).
    model = build(MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=VOCAB, max_seq_len=64))
    with pytest.warns(UserWarning, match="ALiBi being off"):
        _stock_twin_of(model, tmp_path / "default")
    stock = MptConfig.from_pretrained(tmp_path / "default")
    assert (stock.d_model, stock.attn_config.alibi_bias_max, stock.expansion_ratio) == (64, 8, 4)
    # The same defaults with ALiBi on (the hub's MPT) run in stock transformers with the same logits.
    model = build(MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=VOCAB, max_seq_len=64,
                            attn_config={"alibi": True}))
    twin = _stock_twin_of(model, tmp_path / "alibi")
    ids = torch.randint(0, VOCAB, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_every_stock_feature_written_as_yaml_gives_stock_transformers_the_same_logits(tmp_path):
    import yaml

    from mptkit.model.modeling_mpt import transformers_mpt_ignores

    config = MPTConfig(**yaml.safe_load(STOCK_FEATURES_YAML))
    assert config.layer_norm_epsilon == 1e-6 and config.attn.clip_qkv == 1.0
    assert transformers_mpt_ignores(config) == []
    model = build(config)
    twin = _stock_twin_of(model, tmp_path)
    assert twin.config.attn_config.clip_qkv == 1.0 and twin.config.attn_config.softmax_scale == 0.25
    assert twin.config.layer_norm_epsilon == 1e-6
    ids = torch.randint(0, VOCAB, (3, 29))
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    assert _fields(MPTForCausalLM.from_pretrained(tmp_path).config) == _fields(config)


@pytest.mark.parametrize("feature", list(UNSUPPORTED_FEATURES_YAML))
def test_configs_with_features_stock_mpt_lacks_still_load_in_stock_transformers(tmp_path, feature):
    import yaml
    from transformers import AutoConfig

    from mptkit.model.configuration_mpt import merge_config_fields

    fields = {**yaml.safe_load(STOCK_FEATURES_YAML), "init_config": None}
    config = MPTConfig(**merge_config_fields(fields, yaml.safe_load(UNSUPPORTED_FEATURES_YAML[feature])))
    with pytest.warns(UserWarning, match="would silently ignore"):
        MPTForCausalLM(config).save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MptConfig)  # no remote code
    MptConfig.from_pretrained(tmp_path)
    assert _fields(MPTConfig.from_pretrained(tmp_path)) == _fields(config)


def test_a_gqa_config_differs_from_stock_transformers_types_only_in_its_attn_type(tmp_path):
    # Stock MptConfig's attn_type is Literal["multihead_attention", "multiquery_attention"]: a GQA
    # model cannot claim to be either, so only that field is left for it to refuse.
    config = tiny(attn_config={"attn_type": "grouped_query_attention", "kv_n_heads": 2.0, "clip_qkv": 6})
    with pytest.warns(UserWarning, match="kv_n_heads=2"):
        MPTForCausalLM(config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(Exception, match="attn_type"):
        MptConfig(**saved)
    saved["attn_config"]["attn_type"] = "multihead_attention"
    assert MptConfig(**saved).attn_config.clip_qkv == 6.0


# ---------------------------------------------------------------------------------------------
# Against the float64 reference


FEATURES = {
    "alibi-mha": {},
    "alibi-gqa-qkln-clip": dict(attn_config={"attn_type": "grouped_query_attention", "kv_n_heads": 2, "qk_ln": True, "clip_qkv": 0.3}),
    "alibi-mqa-6heads": dict(n_heads=6, d_model=48, attn_config={"attn_type": "multiquery_attention"}),
    "alibi-bias-max-16-prefix-lm": dict(attn_config={"alibi_bias_max": 16, "prefix_lm": True}),
    "rope": dict(attn_config={"alibi": False, "rope": True, "rope_theta": 500.0}),
    "learned": dict(attn_config={"alibi": False}, learned_pos_emb=True),
    "sliding-window": dict(attn_config={"sliding_window_size": 3}),
    "glu-rmsnorm-bias-untied-logitscale": dict(
        ffn_config={"ffn_type": "mptglu"},
        norm_type="rmsnorm",
        no_bias=False,
        tie_word_embeddings=False,
        logit_scale="inv_sqrt_d_model",
        expansion_ratio=3,
    ),
    "layernorm-bias-softmax-scale": dict(norm_type="layernorm", no_bias=False, attn_config={"softmax_scale": 0.2}),
}


def _inputs(batch=2, length=11):
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (batch, length))
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[1, :3] = 0  # left padding in the second row
    return ids, attention_mask


@pytest.mark.parametrize("attn_impl", ["torch", "sdpa"])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_forward_matches_float64_reference(feature, attn_impl):
    overrides = dict(FEATURES[feature])
    overrides["attn_config"] = {**overrides.get("attn_config", {}), "attn_impl": attn_impl}
    config = tiny(**overrides)
    model = build(config, dtype=torch.float64)
    ids, attention_mask = _inputs()
    prefix_mask = None
    if config.attn.prefix_lm:
        prefix_mask = torch.zeros_like(ids)
        prefix_mask[0, :4] = 1
        prefix_mask[1, 3:6] = 1
    with torch.no_grad():
        ours = model(ids, attention_mask=attention_mask, prefix_mask=prefix_mask).logits
    expected = naive_logits(config, model.state_dict(), ids, attention_mask, prefix_mask=prefix_mask)
    real = attention_mask.bool()
    torch.testing.assert_close(ours[real], expected[real], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("feature", ["alibi-mha", "rope", "learned"])
def test_packed_documents_match_reference_and_separate_runs(feature):
    config = tiny(**{**FEATURES[feature], "attn_config": {**FEATURES[feature].get("attn_config", {}), "attn_uses_sequence_id": True}})
    model = build(config, dtype=torch.float64)
    torch.manual_seed(2)
    docs = [torch.randint(0, VOCAB, (n,)) for n in (5, 7, 4)]
    packed = torch.cat(docs)[None]
    sequence_id = torch.cat([torch.full((len(doc),), i) for i, doc in enumerate(docs)])[None]
    with torch.no_grad():
        packed_logits = model(packed, sequence_id=sequence_id).logits[0]
        separate = torch.cat([model(doc[None]).logits[0] for doc in docs])
    torch.testing.assert_close(packed_logits, separate, rtol=1e-9, atol=1e-9)
    expected = naive_logits(config, model.state_dict(), packed, sequence_id=sequence_id)[0]
    torch.testing.assert_close(packed_logits, expected, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Padding and KV cache


@pytest.mark.parametrize("feature", ["alibi-mha", "alibi-gqa-qkln-clip", "rope", "learned"])
@pytest.mark.parametrize("attn_impl", ["torch", "sdpa"])
def test_left_and_right_padding_do_not_change_real_token_outputs(feature, attn_impl):
    overrides = dict(FEATURES[feature])
    overrides["attn_config"] = {**overrides.get("attn_config", {}), "attn_impl": attn_impl}
    model = build(tiny(**overrides))
    torch.manual_seed(3)
    short, long = torch.randint(0, VOCAB, (6,)), torch.randint(0, VOCAB, (10,))
    with torch.no_grad():
        alone_short = model(short[None]).logits[0]
        alone_long = model(long[None]).logits[0]
        left = torch.stack([torch.cat([torch.zeros(4, dtype=torch.long), short]), long])
        left_mask = torch.tensor([[0] * 4 + [1] * 6, [1] * 10])
        out = model(left, attention_mask=left_mask).logits
        torch.testing.assert_close(out[0, 4:], alone_short, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1], alone_long, rtol=1e-5, atol=1e-5)
        right = torch.stack([torch.cat([short, torch.zeros(4, dtype=torch.long)]), long])
        out = model(right, attention_mask=left_mask.flip(1)).logits
        torch.testing.assert_close(out[0, :6], alone_short, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("feature", ["alibi-mha", "alibi-gqa-qkln-clip", "alibi-mqa-6heads", "rope", "learned", "sliding-window"])
@pytest.mark.parametrize("attn_impl", ["torch", "sdpa"])
def test_kv_cache_incremental_decoding_equals_full_forward(feature, attn_impl):
    overrides = dict(FEATURES[feature])
    overrides["attn_config"] = {**overrides.get("attn_config", {}), "attn_impl": attn_impl}
    model = build(tiny(**overrides))
    ids, attention_mask = _inputs(length=14)
    with torch.no_grad():
        full = model(ids, attention_mask=attention_mask).logits
        out = model(ids[:, :8], attention_mask=attention_mask[:, :8], use_cache=True)
        steps = [out.logits]
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        for t in range(8, 14):
            out = model(ids[:, t : t + 1], attention_mask=attention_mask[:, : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    incremental = torch.cat(steps, dim=1)
    real = attention_mask.bool()
    torch.testing.assert_close(incremental[real], full[real], rtol=1e-5, atol=1e-5)


def test_batched_left_padded_generation_equals_single_prompt_generation():
    model = build(tiny())
    prompts = [torch.randint(0, VOCAB, (n,)) for n in (4, 9)]
    batch = torch.stack([torch.cat([torch.zeros(5, dtype=torch.long), prompts[0]]), prompts[1]])
    mask = torch.tensor([[0] * 5 + [1] * 4, [1] * 9])
    together = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert together[row, -6:].tolist() == alone[0, -6:].tolist()


def test_learned_positions_refuse_to_run_past_max_seq_len():
    model = build(tiny(attn_config={"alibi": False}, learned_pos_emb=True, max_seq_len=16))
    with pytest.raises(ValueError, match="cannot extrapolate"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_alibi_runs_past_max_seq_len():
    model = build(tiny(max_seq_len=16))
    assert model(torch.zeros(1, 40, dtype=torch.long)).logits.shape == (1, 40, VOCAB)


# ---------------------------------------------------------------------------------------------
# Training-related behaviour


def test_loss_is_shifted_cross_entropy_ignoring_minus_100():
    model = build(tiny())
    ids = torch.randint(0, VOCAB, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(ids, labels=labels)
    logp = torch.log_softmax(out.logits.double(), -1)
    picked = [-logp[b, t - 1, labels[b, t]] for b in range(2) for t in range(1, 9) if labels[b, t] != -100]
    assert out.loss.item() == pytest.approx(torch.stack(picked).mean().item(), rel=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = build(tiny())
    model.train()
    ids = torch.randint(0, VOCAB, (2, 12))
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    calls = []  # the attention of each block runs again in backward: the recompute happens
    for block in model.transformer.blocks:
        block.attn.register_forward_hook(lambda *_: calls.append(1))
    model(ids, labels=ids).loss.backward()
    assert len(calls) == 2 * len(model.transformer.blocks)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], rtol=1e-5, atol=1e-6)


def test_init_scheme_kaiming_fan_in_with_residual_division():
    config = MPTConfig.from_preset("tiny", d_model=256, n_heads=4, n_layers=8, vocab_size=4096)
    torch.manual_seed(0)
    model = MPTForCausalLM(config)
    block = model.transformer.blocks[0]
    relu_kaiming = math.sqrt(2.0 / 256)  # gain sqrt(2) / sqrt(fan_in)
    assert block.attn.Wqkv.weight.std().item() == pytest.approx(relu_kaiming, rel=0.03)
    assert block.ffn.up_proj.weight.std().item() == pytest.approx(relu_kaiming, rel=0.03)
    assert block.attn.out_proj.weight.std().item() == pytest.approx(relu_kaiming / math.sqrt(16), rel=0.03)
    assert block.ffn.down_proj.weight.std().item() == pytest.approx(math.sqrt(2.0 / 1024) / math.sqrt(16), rel=0.03)
    assert torch.all(block.norm_1.weight == 1)


def test_meta_construction_then_reset_parameters():
    config = tiny()
    with torch.device("meta"):
        model = MPTForCausalLM(config)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.reset_parameters()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model(torch.zeros(1, 5, dtype=torch.long)).logits.isfinite().all()


def test_low_precision_layernorm_runs_in_the_autocast_dtype():
    model = build(tiny())
    norm = model.transformer.blocks[0].norm_1
    x = torch.randn(2, 5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16
    expected = torch.nn.functional.layer_norm(x.bfloat16(), (64,), norm.weight.bfloat16(), None, 1e-5)
    assert torch.equal(y, expected)


def test_bf16_autocast_forward_stays_close_to_fp32():
    model = build(tiny(attn_config={"attn_impl": "sdpa"}))
    ids = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        fp32 = model(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(ids).logits.float()
    assert (bf16 - fp32).abs().max().item() < 0.1 * fp32.abs().max().item()


# ---------------------------------------------------------------------------------------------
# Checkpoints


def test_save_load_round_trip_is_exact_including_sharded(tmp_path):
    model = build(tiny(attn_config={"attn_type": "grouped_query_attention", "kv_n_heads": 2}))
    with pytest.warns(UserWarning):
        model.save_pretrained(tmp_path / "one")
        model.save_pretrained(tmp_path / "sharded", max_shard_size="300KB")
    assert len([f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]) > 1
    config = json.loads((tmp_path / "one" / "config.json").read_text())
    assert config["model_type"] == "mpt" and config["architectures"] == ["MPTForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mpt.MPTForCausalLM"
    for folder in ("one", "sharded"):
        loaded = MPTForCausalLM.from_pretrained(tmp_path / folder)
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), name


def test_loads_hub_style_sharded_pytorch_bin_checkpoints(tmp_path):
    model = build(tiny())
    model.config.save_pretrained(tmp_path)
    state = model.state_dict()
    names = list(state)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves, start=1):
        filename = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({n: state[n] for n in part}, tmp_path / filename)
        weight_map.update({n: filename for n in part})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded = MPTForCausalLM.from_pretrained(tmp_path, max_seq_len=4096)
    assert loaded.config.max_seq_len == 4096
    for name, tensor in state.items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


MODEL_CARD_SNIPPET = """
import sys
sys.modules["mptkit"] = None  # prove the checkpoint needs no mptkit
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
name = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=True, torch_dtype="auto", device_map="auto")
inputs = tokenizer("Here is a recipe for vegan banana bread:", return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
print("IDS", output[0].tolist())
print("MODULE", type(model).__module__)
"""


def test_model_card_snippet_runs_without_mptkit(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=TOKENIZER_FILE, eos_token="<|endoftext|>")
    model = build(tiny(vocab_size=50432))
    model.save_pretrained(tmp_path, tokenizer=tokenizer)
    script = tmp_path / "card.py"
    script.write_text(textwrap.dedent(MODEL_CARD_SNIPPET))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ids = json.loads(result.stdout.split("IDS", 1)[1].splitlines()[0])
    assert "transformers_modules" in result.stdout
    prompt = tokenizer("Here is a recipe for vegan banana bread:", return_tensors="pt")
    expected = model.generate(**prompt, max_new_tokens=8, do_sample=False)[0].tolist()
    assert ids == expected
