"""mptkit.loading: every layout a user points at becomes the same model and tokenizer, and a
broken file is named in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from mptkit.data.tokenizer import load_tokenizer, train_tokenizer
from mptkit.inference.commands import main as inference_main
from mptkit.loading import CheckpointError, HFDirectory, find_source, load, load_model, tokenizer_location
from mptkit.model import MPTConfig, MPTForCausalLM

IDS = torch.tensor([[5, 17, 200, 3, 99, 41]])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny model and its logits on IDS, saved as the single-file HF layout."""
    torch.manual_seed(3)
    model = MPTForCausalLM(MPTConfig.from_preset("tiny", vocab_size=512)).eval()
    directory = tmp_path_factory.mktemp("single")
    model.save_pretrained(directory)
    with torch.no_grad():
        logits = model(IDS).logits
    return model, directory, logits


def _logits(path, **kwargs):
    model, source = load_model(path, **kwargs)
    with torch.no_grad():
        return model(IDS).logits, source


def test_sharded_safetensors_load_as_the_single_file(reference, tmp_path):
    model, _, expected = reference
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    logits, source = _logits(tmp_path)
    assert source == HFDirectory(tmp_path)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_a_hub_download_with_sharded_bin_files_loads(reference, tmp_path):
    """mosaicml/mpt-7b ships pytorch_model-0000N-of-00002.bin with an index."""
    model, single, expected = reference
    shutil.copy(single / "config.json", tmp_path / "config.json")
    state = model.state_dict()
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    weight_map = {}
    for file, keys in halves.items():
        torch.save({k: state[k] for k in keys}, tmp_path / file)
        weight_map.update(dict.fromkeys(keys, file))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    logits, _ = _logits(tmp_path)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_dtype_names_long_and_short_agree(reference):
    _, directory, _ = reference
    for name in ("bfloat16", "bf16"):
        model, _ = load_model(directory, dtype=name)
        assert model.transformer.wte.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="expected one of auto, float32"):
        load_model(directory, dtype="half-ish")


def _first_line_error(capsys, argv) -> str:
    assert inference_main("generate", argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_truncated_safetensors_is_named_in_one_line(reference, tmp_path, capsys):
    _, single, _ = reference
    shutil.copytree(single, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as handle:
        handle.truncate(size - 1000)
    err = _first_line_error(capsys, [str(tmp_path / "m"), "--prompt", "hi", "--max-new-tokens", "2"])
    assert str(weights) in err and "truncated" in err and "1000 missing" in err
    with open(weights, "r+b") as handle:  # cut inside the header itself
        handle.truncate(100)
    err = _first_line_error(capsys, [str(tmp_path / "m"), "--prompt", "hi", "--max-new-tokens", "2"])
    assert str(weights) in err and "truncated" in err


def test_corrupt_or_missing_weight_files_are_named(reference, tmp_path):
    model, single, _ = reference
    shutil.copy(single / "config.json", tmp_path / "config.json")
    bad = tmp_path / "pytorch_model.bin"
    bad.write_bytes(b"this is not a pickle" * 10)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: cannot be loaded"):
        load_model(tmp_path)
    bad.unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(tmp_path)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    (tmp_path / "sharded" / "model-00002-of-00007.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lists model-00002-of-00007.safetensors, which is missing"):
        load_model(tmp_path / "sharded")


def test_a_path_that_is_no_model_says_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        find_source(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="expected an HF-format model directory"):
        find_source(tmp_path)


def test_learned_positions_refuse_a_longer_context(tmp_path):
    config = MPTConfig.from_preset("tiny", vocab_size=512, max_seq_len=32,
                                   attn_config={"alibi": False}, learned_pos_emb=True)
    MPTForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="learned position embeddings for 32 positions"):
        load_model(tmp_path, max_seq_len=64)
    model, _ = load_model(tmp_path, max_seq_len=16)  # within the table: nothing changes
    assert model.config.max_seq_len == 32


def _save_training_checkpoint(directory, model, run_config):
    from mptkit.train.checkpoint import Checkpointer
    from mptkit.train.parallel import DistributedEnv

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    env = DistributedEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    return Checkpointer(directory, keep_last_n=2, env=env).save(
        7, model, optimizer, scheduler, {}, {}, model.config.to_json_string(), run_config)


def test_one_tokenizer_rule(reference, tmp_path):
    """Explicit choice > files beside the weights > the training run's data.tokenizer > bundled."""
    model, single, _ = reference
    trained = train_tokenizer(_corpus(tmp_path), 300, tmp_path / "tok",
                              progress=False)
    checkpoint = _save_training_checkpoint(tmp_path / "run", model, {"data": {"tokenizer": str(tmp_path / "tok")}})
    source = find_source(tmp_path / "run")
    assert source.path == checkpoint and source.step == 7
    assert tokenizer_location(source) == str(tmp_path / "tok")
    assert len(load(tmp_path / "run").tokenizer) == len(trained)
    assert tokenizer_location(source, "EleutherAI/gpt-neox-20b") == "EleutherAI/gpt-neox-20b"
    assert tokenizer_location(find_source(single)) is None  # saved without one: MPT's own
    assert len(load(single).tokenizer) == len(load_tokenizer())
    model.save_pretrained(tmp_path / "with-tok", tokenizer=trained)
    assert tokenizer_location(find_source(tmp_path / "with-tok")) == str(tmp_path / "with-tok")


def _corpus(tmp_path) -> list[str]:
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return [str(text)]


def test_eval_reads_a_training_checkpoint_as_its_export(reference, tmp_path, capsys):
    """`mptkit eval` takes a run directory: the same perplexity as the HF export of that step."""
    from mptkit.eval.commands import main as eval_main
    from mptkit.export.hf import export_hf

    torch.manual_seed(5)
    model = MPTForCausalLM(MPTConfig.from_preset("tiny"))  # the bundled tokenizer's vocabulary
    _save_training_checkpoint(tmp_path / "run", model, {"data": {"tokenizer": None}})
    export_hf(tmp_path / "run", tmp_path / "hf")
    text = tmp_path / "doc.txt"
    text.write_text("Call me Ishmael. Some years ago, never mind how long precisely, I went to sea. " * 8)
    results = []
    for path in (tmp_path / "run", tmp_path / "hf"):
        out = tmp_path / f"{path.name}.json"
        assert eval_main("eval", ["perplexity", str(path), str(text), "--seq-len", "32", "--quiet",
                                  "--json", str(out)]) == 0
        results.append(json.loads(out.read_text())["perplexity"])
    capsys.readouterr()
    assert results[0] == results[1] and results[0] > 1


def test_python_dash_m_mptkit():
    done = subprocess.run([sys.executable, "-m", "mptkit", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: mptkit COMMAND" in done.stdout and "export" in done.stdout
