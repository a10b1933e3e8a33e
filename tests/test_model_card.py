"""The model card (README.md) of every export: hub front matter, the architecture of the model
written, what the checkpoint records of its training and evaluation (checked against the run's own
metrics log and config), and loading snippets that run."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch
import yaml

from mptkit.export.gguf import export_gguf
from mptkit.export.hf import export_hf
from mptkit.loading import find_source
from mptkit.model import MPTConfig, MPTForCausalLM
from mptkit.train.config import load_run
from mptkit.train.loop import train

from .test_composer_checkpoint import composer_state
from .train_support import PRETRAIN_YAML, pretrain_overrides


def front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


def section(card: str, title: str) -> str:
    return card.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """4 tiny steps with validation at 2 and 4 and checkpoints at both."""
    out = tmp_path_factory.mktemp("card-run")
    overrides = pretrain_overrides(out, steps=4, **{
        "name": "card-run", "data.val": "[data/books/heldout/pg11.txt.gz]", "eval.interval": 2,
        "eval.max_batches": 2, "checkpoint.interval": 2, "checkpoint.keep_last_n": 2})
    train(load_run(PRETRAIN_YAML, overrides))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, rows


def test_a_training_checkpoints_card_states_its_training_and_the_evaluation_at_its_step(run, tmp_path):
    out, rows = run
    export_hf(out / "checkpoints" / "step_00000002", tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    meta = front_matter(card)
    assert card.split("---\n", 2)[2].startswith("\n# card-run\n")  # the run's name, not "checkpoints"
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation" and {"mpt", "text-generation"} <= set(meta["tags"])

    config = MPTConfig.from_pretrained(tmp_path / "hf")
    architecture = section(card, "Architecture")
    assert f"| blocks | {config.n_layers} |" in architecture and f"| d_model | {config.d_model} |" in architecture
    assert f"| context trained | {config.max_seq_len} tokens |" in architecture and "ALiBi" in architecture

    assert find_source(out / "checkpoints").name == out.name  # GGUF's general.name: the run directory's
    training = section(card, "Training")
    tokens = next(r["tokens_seen"] for r in rows if r["step"] == 2 and "tokens_seen" in r)
    assert f"Trained for 2 optimizer steps of 4 planned, {tokens:,} tokens." in training
    assert "Run: `card-run`" in training and "data/books/train/pg16.txt.gz" in training
    assert "4 sequences x 64 tokens" in training

    # the validation of step 2, not the later one of step 4 (which these weights never saw)
    val = next(r for r in rows if r["step"] == 2 and "val_loss" in r)
    evaluation = section(card, "Evaluation")
    assert f"| 2 | {val['val_loss']:.4f} | {math.exp(val['val_loss']):.2f} | {val['val_tokens']:,} |" in evaluation
    assert "pg11.txt.gz" in evaluation


def test_the_cards_transformers_snippet_runs(run, tmp_path):
    out, _ = run
    export_hf(out / "checkpoints", tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    snippet = section(card, "How to use").split("```python\n", 1)[1].split("```", 1)[0]
    assert "trust_remote_code=True" in snippet
    snippet = snippet.replace("max_new_tokens=64", "max_new_tokens=4")
    result = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Here is a recipe" in result.stdout and "<|im_start|>user" in result.stdout


def test_a_directory_without_a_record_says_so(tiny_checkpoint, tmp_path):
    export_hf(tiny_checkpoint, tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "not recorded" in section(card, "Training") and "None recorded" in section(card, "Evaluation")
    assert f"# {tiny_checkpoint.name}\n" in card


def test_a_composer_checkpoints_card_has_its_step_tokens_and_run_name(tmp_path):
    torch.manual_seed(4)
    torch.save(composer_state(MPTForCausalLM(MPTConfig.from_preset("tiny")), step=1500), tmp_path / "ba1500.pt")
    export_hf(tmp_path / "ba1500.pt", tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "# mpt-tiny-foundry\n" in card
    assert f"Trained for 1,500 optimizer steps, {8 * 128 * 1500:,} tokens." in section(card, "Training")


def test_a_gguf_export_into_a_directory_gets_a_card_and_a_file_export_none(tiny_checkpoint, tmp_path):
    pytest.importorskip("gguf")
    _, written = export_gguf(tiny_checkpoint, f"{tmp_path / 'gguf'}/", outtype="f32")
    card = (tmp_path / "gguf" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "gguf" and "gguf" in meta["tags"] and meta["license"] == "apache-2.0"
    assert f"{tmp_path / 'gguf'}/{written.name}" in section(card, "How to use")
    assert "f32 GGUF" in section(card, "Architecture")
    export_gguf(tiny_checkpoint, tmp_path / "single.gguf", outtype="f32")
    assert not (tmp_path / "README.md").exists()


def test_an_export_without_its_tokenizer_points_the_snippet_at_mpts(tiny_checkpoint, tmp_path):
    export_hf(tiny_checkpoint, tmp_path / "hf", with_tokenizer=False)
    usage = section((tmp_path / "hf" / "README.md").read_text(), "How to use")
    assert 'AutoTokenizer.from_pretrained("EleutherAI/gpt-neox-20b")' in usage
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
