"""Composer / llm-foundry checkpoints in (mptkit.loading.composer): a checkpoint file laid out as
Composer's trainer writes llm-foundry's MPT (built here, no composer or llm-foundry installed)
exports to a directory that transformers' own MptForCausalLM reads to the same logits, starts a
training run, and is read without running code from the pickle."""

from __future__ import annotations

import datetime
import json
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from mptkit.data.tokenizer import bundled_tokenizer_path
from mptkit.export.commands import main as export_main
from mptkit.loading import CheckpointError, ComposerFile, find_source, load, load_model
from mptkit.model import MPTConfig, MPTForCausalLM

from .train_support import PRETRAIN_YAML, pretrain_overrides

IDS = torch.tensor([[5, 17, 200, 3, 99, 41, 7]])


def llm_foundry_config(config: MPTConfig) -> dict:
    """The config as llm-foundry's MPTConfig.to_dict() stores it in a training checkpoint: the hub's
    fields, the training machine's kernel and init device, and keys mptkit does not use."""
    fields = config.to_dict()
    fields["attn_config"] = {**fields["attn_config"], "attn_impl": "flash"}
    fields.update(init_device="meta", fc_type="torch", use_pad_tok_in_ffn=True, verbose=0,
                  architectures=["MPTForCausalLM"],
                  auto_map={"AutoConfig": "configuration_mpt.MPTConfig",
                            "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM"})
    fields["ffn_config"] = {**fields["ffn_config"], "fc_type": "torch"}
    return fields


def saved_tokenizer(directory) -> dict:
    """Composer's record of the HF tokenizer: each file of save_pretrained as {file_extension, content}."""
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_file=str(bundled_tokenizer_path()), eos_token="<|endoftext|>").save_pretrained(directory)
    return {file.stem: {"file_extension": ".json", "content": json.loads(file.read_text())}
            for file in sorted(directory.glob("*.json"))}


def composer_state(model: MPTForCausalLM, *, step: int = 2000, tokenizer: dict | None = None) -> dict:
    """What Composer's Trainer saves for ComposerMPTCausalLM (see mptkit/loading/composer.py)."""
    weights = {f"model.{name}": tensor.detach().clone() for name, tensor in model.state_dict().items()}
    adam = {"state": {name: {"exp_avg": torch.randn_like(t), "exp_avg_sq": torch.rand_like(t), "step": torch.tensor(1.0 * step)}
                      for name, t in weights.items()},
            "param_groups": [{"lr": 6e-4, "betas": (0.9, 0.95), "params": list(weights)}]}
    return {
        "state": {
            "model": weights,
            "optimizers": {"DecoupledAdamW": adam},
            "schedulers": [{"base_lrs": [6e-4], "last_epoch": step}],
            "algorithms": [("GradientClipping", {"clipping_threshold": 1.0})],
            "callbacks": {},
            "timestamp": {"epoch": 0, "batch": step, "sample": 8 * step, "token": 8 * 128 * step,
                          "batch_in_epoch": step, "total_wct": datetime.timedelta(hours=3, seconds=7),
                          "epoch_wct": datetime.timedelta(hours=3), "batch_wct": datetime.timedelta(seconds=1)},
            "integrations": {"huggingface": {
                "model": {"config": {"file_extension": ".json", "content": llm_foundry_config(model.config),
                                     "class": "llmfoundry.models.mpt.configuration_mpt.MPTConfig"}},
                "tokenizer": tokenizer or {}}},
            "run_name": "mpt-tiny-foundry",
            "metadata": {},
        },
        "rng": [{"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}],
    }


@pytest.fixture(scope="module")
def foundry(tmp_path_factory):
    torch.manual_seed(11)
    model = MPTForCausalLM(MPTConfig.from_preset("tiny")).eval()
    path = tmp_path_factory.mktemp("composer") / "ep0-ba2000-rank0.pt"
    torch.save(composer_state(model, tokenizer=saved_tokenizer(path.parent / "tokenizer")), path)
    with torch.no_grad():
        logits = model(IDS).logits
    return model, path, logits


def test_a_composer_checkpoint_exports_to_what_transformers_reads_to_the_same_logits(foundry, tmp_path):
    from transformers import MptForCausalLM

    model, path, expected = foundry
    assert export_main("export", [str(path), str(tmp_path / "hf")]) == 0
    reference = MptForCausalLM.from_pretrained(tmp_path / "hf").eval()  # transformers' own MPT
    with torch.no_grad():
        torch.testing.assert_close(reference(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved["attn_config"]["attn_impl"] == "torch"  # not the training machine's flash kernel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    bundled = AutoTokenizer.from_pretrained(path.parent / "tokenizer")
    text = "Composer checkpoints, read without composer."
    assert tokenizer(text).input_ids == bundled(text).input_ids


def test_the_loader_reads_weights_step_and_tokenizer(foundry):
    model, path, expected = foundry
    loaded = load(path, dtype="float32")
    assert loaded.source == find_source(path) and isinstance(loaded.source, ComposerFile)
    assert loaded.source.step == 2000 and loaded.source.name == "mpt-tiny-foundry"
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert loaded.tokenizer.chat_template  # mptkit's conventions on the stored tokenizer
    bf16, _ = load_model(path, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())


def test_a_training_run_starts_from_a_composer_checkpoint(foundry, tmp_path):
    from mptkit.train.config import load_run
    from mptkit.train.loop import initial_model

    model, path, _ = foundry
    run = load_run(PRETRAIN_YAML, pretrain_overrides(tmp_path, 2, **{"model.init_from": path,
                                                                   "model.resid_pdrop": 0.1}))
    assert run.model_config.resid_pdrop == 0.1 and run.model_config.d_model == model.config.d_model
    started = initial_model(run)
    for name, tensor in model.state_dict().items():
        assert torch.equal(started.state_dict()[name], tensor), name


def test_a_pickle_that_needs_code_is_refused_and_its_code_never_runs(tmp_path):
    """A pickled object whose reduction would create a file: weights_only=True refuses to build it."""
    marker = tmp_path / "code-ran"
    script = textwrap.dedent(f"""
        import pathlib, torch

        class Callback:
            def __reduce__(self):
                return (pathlib.Path.touch, (pathlib.Path({str(marker)!r}),))

        torch.save({{"state": {{"model": {{}}, "callbacks": {{"Evil": Callback()}}}}}}, {str(tmp_path / 'evil.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as failure:
        load_model(tmp_path / "evil.pt")
    message = str(failure.value)
    assert "weights_only=True" in message and "pathlib" in message and "evil.pt" in message
    assert not marker.exists()


def test_files_that_are_not_llm_foundry_checkpoints_fail_naming_what_is_missing(foundry, tmp_path):
    model, path, _ = foundry
    plain = tmp_path / "state_dict.pt"
    torch.save(model.state_dict(), plain)
    with pytest.raises(CheckpointError, match=r"state_dict.pt: not a Composer/llm-foundry checkpoint: no state"):
        load_model(plain)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated.pt: cannot be read as a torch.save file"):
        load_model(truncated)

    state = composer_state(model)
    state["state"]["integrations"]["huggingface"]["model"]["config"]["content"]["n_layers"] = 3
    torch.save(state, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match=r"mismatch.pt: the weights do not match .* lacks 'transformer.blocks.2"):
        load_model(tmp_path / "mismatch.pt")

    del state["state"]["integrations"]
    torch.save(state, tmp_path / "no_config.pt")
    with pytest.raises(CheckpointError, match=r"no state.integrations \("):
        load_model(tmp_path / "no_config.pt")


def test_a_checkpoint_without_a_saved_tokenizer_uses_mpts(tmp_path):
    torch.manual_seed(2)
    model = MPTForCausalLM(MPTConfig.from_preset("tiny")).eval()
    torch.save(composer_state(model), tmp_path / "latest-rank0.pt")
    loaded = load(tmp_path / "latest-rank0.pt")
    assert loaded.tokenizer.eos_token == "<|endoftext|>" and len(loaded.tokenizer) >= 50277


_PEAK_SCRIPT = """
import sys, threading, time
import torch
from mptkit.loading import load_model
import mptkit.loading.composer, mptkit.model, mptkit.data.tokenizer  # imports are not the reading

def anonymous_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

peak = [anonymous_kib()]
baseline = peak[0]
done = threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anonymous_kib())
        time.sleep(0.001)

thread = threading.Thread(target=sample)
thread.start()
model, _ = load_model(sys.argv[1])
done.set()
thread.join()
peak[0] = max(peak[0], anonymous_kib())
print((peak[0] - baseline) * 1024, sum(p.numel() * p.element_size() for p in model.parameters()))
"""


def test_reading_streams_the_weights_and_never_the_optimizer_state(tmp_path):
    """The file holds weights plus Adam's two moments (3x the weights); reading it for the model
    adds about one copy of the weights to the process, not the whole file."""
    torch.manual_seed(5)
    model = MPTForCausalLM(MPTConfig.from_preset("tiny", d_model=256, n_layers=4, n_heads=4)).eval()
    path = tmp_path / "big.pt"
    torch.save(composer_state(model), path)
    result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(path)], capture_output=True, text=True, check=True)
    added, weight_bytes = map(int, result.stdout.split())
    assert path.stat().st_size > 2.9 * weight_bytes
    assert added < 1.5 * weight_bytes, (added, weight_bytes)
