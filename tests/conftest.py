"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
import torch

from mptkit.data.tokenizer import load_tokenizer
from mptkit.model import MPTConfig, MPTForCausalLM


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A saved HF-format tiny MPT with the bundled tokenizer; weights wide enough (init std 0.3)
    that greedy decoding does not collapse into one repeated token. Read-only for its users."""
    directory = tmp_path_factory.mktemp("tiny-mpt")
    config = MPTConfig.from_preset("tiny", init_config={"name": "baseline_", "init_std": 0.3})
    torch.manual_seed(0)
    MPTForCausalLM(config).save_pretrained(directory, tokenizer=load_tokenizer())
    return directory
