"""Named MPT configurations: `MPTConfig.from_preset(name, **overrides)`.

Each preset names its source. The 7B/30B entries reproduce the hub config.json files; the small
sizes take llm-foundry's pretraining yaml shapes with the hub's vocabulary (50432) and ALiBi.
"""

from __future__ import annotations

import copy

# Shared by every published MPT (hub config.json of mosaicml/mpt-7b*).
_HUB_ATTN = {
    "attn_type": "multihead_attention",
    "attn_impl": "torch",
    "attn_pdrop": 0,
    "alibi": True,
    "alibi_bias_max": 8,
    "clip_qkv": None,
    "qk_ln": False,
    "prefix_lm": False,
    "attn_uses_sequence_id": False,
    "softmax_scale": None,
}
_HUB_COMMON = {
    "expansion_ratio": 4,
    "vocab_size": 50432,
    "no_bias": True,
    "norm_type": "low_precision_layernorm",
    "learned_pos_emb": True,
    "emb_pdrop": 0.0,
    "resid_pdrop": 0.0,
    "embedding_fraction": 1.0,
    "logit_scale": None,
    "attn_config": _HUB_ATTN,
}


def _shape(d_model: int, n_heads: int, n_layers: int, max_seq_len: int = 2048, **extra) -> dict:
    fields = copy.deepcopy(_HUB_COMMON)
    fields.update(d_model=d_model, n_heads=n_heads, n_layers=n_layers, max_seq_len=max_seq_len)
    for key, value in extra.items():
        if key == "attn_config":
            fields["attn_config"] = {**fields["attn_config"], **value}
        else:
            fields[key] = value
    return fields


PRESETS: dict[str, dict] = {
    # hub: mosaicml/mpt-7b, -instruct, -chat (identical architecture; they differ in weights)
    "mpt-7b": _shape(4096, 32, 32),
    "mpt-7b-instruct": _shape(4096, 32, 32),
    "mpt-7b-chat": _shape(4096, 32, 32),
    # hub: mosaicml/mpt-7b-storywriter (fine-tuned at 65k context, clip_qkv 6, alibi_bias_max 16)
    "mpt-7b-storywriter": _shape(4096, 32, 32, 65536, attn_config={"alibi_bias_max": 16, "clip_qkv": 6}),
    # hub: mosaicml/mpt-30b
    "mpt-30b": _shape(7168, 64, 48, 8192),
    # llm-foundry scripts/train/yamls/pretrain/mpt-{125m,350m,1b}.yaml shapes
    "mpt-125m": _shape(768, 12, 12),
    "mpt-350m": _shape(1024, 16, 24),
    "mpt-1b": _shape(2048, 16, 24),
    # for tests and the demo: the real vocabulary, a toy body
    "tiny": _shape(64, 4, 2, 256),
}


def preset_fields(name: str) -> dict:
    """A fresh copy of a preset's config fields; unknown names list the choices."""
    if name not in PRESETS:
        raise KeyError(f"unknown MPT preset {name!r}; choose one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
