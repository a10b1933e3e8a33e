"""MPT for current vLLM: an out-of-tree model plugin.

vLLM ran MPT natively up to v0.28; later versions list `MPTForCausalLM` / `MptForCausalLM` as
"previously supported" and refuse them. vLLM loads the functions named by the `vllm.general_plugins`
entry point in every process it starts (pyproject.toml names `register` below), so with mptkit
installed beside vLLM both architecture names resolve to `mptkit.vllm_plugin.model`, with no flag.

This is the only part of mptkit that imports vllm, and it does so only when vLLM calls it.
"""

from __future__ import annotations

ARCHITECTURES = ("MPTForCausalLM", "MptForCausalLM")  # mptkit's and the hub's name, transformers' name
MODEL_CLASS = "mptkit.vllm_plugin.model:MPTForCausalLM"


def register() -> None:
    """Point vLLM's model registry at our MPT for both names (lazily: the class loads when used), and
    read every `model_type: mpt` config with mptkit's MPTConfig.

    transformers' own MptConfig refuses grouped-query attention and drops `ffn_config`, so without
    that a GQA or GLU checkpoint would fail before (or while) loading. A checkpoint served with
    `trust_remote_code` still uses its own config class, which our model reads through to_dict().
    """
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from mptkit.model import MPTConfig

    AutoConfig.register("mpt", MPTConfig, exist_ok=True)
    for architecture in ARCHITECTURES:
        ModelRegistry.register_model(architecture, MODEL_CLASS)
