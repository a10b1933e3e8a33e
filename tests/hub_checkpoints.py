"""Tiny checkpoints in the layout of the published MPT repositories: the hub's config.json fields
(from MosaicML's mpt-7b family, shapes shrunk), weights as sharded `pytorch_model-0000N-of-0000M.bin`
with an index, the GPT-NeoX tokenizer. mptkit's own exports never write this layout."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from mptkit.data.tokenizer import load_tokenizer
from mptkit.model import MPTConfig, MPTForCausalLM

# mosaicml/mpt-7b's config.json as the hub has it (its -instruct and -chat differ only in their
# names; -storywriter in max_seq_len 65536, alibi_bias_max 16, clip_qkv 6).
HUB_MPT7B_FIELDS = {
    "architectures": ["MPTForCausalLM"],
    "attn_config": {
        "alibi": True,
        "alibi_bias_max": 8,
        "attn_impl": "torch",
        "attn_pdrop": 0,
        "attn_type": "multihead_attention",
        "attn_uses_sequence_id": False,
        "clip_qkv": None,
        "prefix_lm": False,
        "qk_ln": False,
        "softmax_scale": None,
    },
    "auto_map": {"AutoConfig": "configuration_mpt.MPTConfig", "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM"},
    "d_model": 4096,
    "emb_pdrop": 0,
    "embedding_fraction": 1.0,
    "expansion_ratio": 4,
    "init_config": {
        "emb_init_std": None,
        "emb_init_uniform_lim": None,
        "fan_mode": "fan_in",
        "init_div_is_residual": True,
        "init_gain": 0,
        "init_nonlinearity": "relu",
        "init_std": 0.02,
        "name": "kaiming_normal_",
        "verbose": 0,
    },
    "init_device": "cpu",
    "learned_pos_emb": True,
    "logit_scale": None,
    "max_seq_len": 2048,
    "model_type": "mpt",
    "n_heads": 32,
    "n_layers": 32,
    "no_bias": True,
    "norm_type": "low_precision_layernorm",
    "resid_pdrop": 0,
    "tokenizer_name": "EleutherAI/gpt-neox-20b",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.28.1",
    "use_cache": False,
    "verbose": 0,
    "vocab_size": 50432,
}


def hub_fields(**changes) -> dict:
    """HUB_MPT7B_FIELDS with `changes`; an `attn_config` change is merged key by key."""
    fields = json.loads(json.dumps(HUB_MPT7B_FIELDS))
    fields["attn_config"].update(changes.pop("attn_config", {}))
    fields.update(changes)
    return fields


def write_hub_checkpoint(directory: Path, fields: dict, shards: int = 2, seed: int = 0,
                         init_std: float | None = None) -> MPTForCausalLM:
    """A random model of `fields` saved as the hub does; returns the model (fp32) it wrote."""
    directory.mkdir(parents=True, exist_ok=True)
    build = dict(fields)
    if init_std is not None:  # a wider spread than MPT's init, so that greedy decoding wanders
        build["init_config"] = {**build["init_config"], "name": "baseline_", "init_std": init_std}
    torch.manual_seed(seed)
    model = MPTForCausalLM(MPTConfig(**build)).eval()
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    names = sorted(state)
    weight_map = {}
    for index in range(shards):
        file = f"pytorch_model-{index + 1:05d}-of-{shards:05d}.bin"
        part = names[index * len(names) // shards:(index + 1) * len(names) // shards]
        torch.save({name: state[name] for name in part}, directory / file)
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (directory / "config.json").write_text(json.dumps(fields, indent=2))
    load_tokenizer().save_pretrained(str(directory))
    return model


def write_cached_repo(cache: Path, repo_id: str, files_from: Path, commit: str, ref: str = "main") -> Path:
    """`files_from`'s files as huggingface_hub's cache holds a downloaded revision: content-addressed
    blobs, a snapshot directory of links to them named by the commit, and refs/<ref> naming the
    commit. Returns the snapshot directory."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(files_from.iterdir()):
        if file.is_file():
            data = file.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs" / ref).write_text(commit)
    return snapshot
