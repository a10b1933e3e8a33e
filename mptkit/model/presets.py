"""Named MPT configurations: `MPTConfig.from_preset(name, **overrides)`.

Each preset names its source. The 7B/30B entries reproduce the hub config.json files; the small
sizes take llm-foundry's pretraining yaml shapes with the hub's vocabulary (50432) and ALiBi.
"""

from __future__ import annotations

import copy

# Every published MPT (hub config.json of mosaicml/mpt-7b*, mpt-30b) differs from MPTConfig's defaults
# (llm-foundry's) only in its shape and in ALiBi being on: its expansion_ratio 4, vocab_size 50432,
# low_precision_layernorm without biases, alibi_bias_max 8, attn_pdrop 0, no clip_qkv, qk_ln or
# prefix_lm, and its init_config are those defaults, so they are written only there.
_HUB_COMMON = {"attn_config": {"alibi": True}}


def _shape(d_model: int, n_heads: int, n_layers: int, attn_config: dict | None = None, **extra) -> dict:
    """A hub-style preset of this shape; `extra` fields (max_seq_len, ...) beside it, `attn_config`
    keys over the common ones. Plain data: this module imports nothing of the model."""
    attn = {**_HUB_COMMON["attn_config"], **(attn_config or {})}
    return dict(d_model=d_model, n_heads=n_heads, n_layers=n_layers, **extra, attn_config=attn)


PRESETS: dict[str, dict] = {
    # hub: mosaicml/mpt-7b, -instruct, -chat (identical architecture; they differ in weights)
    "mpt-7b": _shape(4096, 32, 32),
    "mpt-7b-instruct": _shape(4096, 32, 32),
    "mpt-7b-chat": _shape(4096, 32, 32),
    # hub: mosaicml/mpt-7b-storywriter (fine-tuned at 65k context, clip_qkv 6, alibi_bias_max 16)
    "mpt-7b-storywriter": _shape(4096, 32, 32, max_seq_len=65536, attn_config={"alibi_bias_max": 16, "clip_qkv": 6}),
    # hub: mosaicml/mpt-30b
    "mpt-30b": _shape(7168, 64, 48, max_seq_len=8192),
    # llm-foundry scripts/train/yamls/pretrain/mpt-{125m,350m,1b}.yaml shapes
    "mpt-125m": _shape(768, 12, 12),
    "mpt-350m": _shape(1024, 16, 24),
    "mpt-1b": _shape(2048, 16, 24),
    # for tests and the demo: the real vocabulary, a toy body
    "tiny": _shape(64, 4, 2, max_seq_len=256),
}


def preset_fields(name: str) -> dict:
    """A fresh copy of a preset's config fields; unknown names list the choices."""
    if name not in PRESETS:
        raise KeyError(f"unknown MPT preset {name!r}; choose one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
