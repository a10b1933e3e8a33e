"""The MPT model: config, presets, ALiBi, attention backends and the causal LM.

Depends only on torch and transformers: these files are copied beside saved checkpoints.
"""

from .configuration_mpt import ConfigError, MPTConfig
from .modeling_mpt import MPTForCausalLM, MPTModel

__all__ = ["ConfigError", "MPTConfig", "MPTForCausalLM", "MPTModel"]
