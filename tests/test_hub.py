"""Models by hub name, without the network: the published MPT repositories' layouts in a hub cache
built here (offline), and the download path over real HTTP from a small fake hub on 127.0.0.1
(tests/fake_hub.py, pointed at with HF_ENDPOINT): what is fetched, revisions, 401, 404, and the
one-line errors. The reference for every logit is the model that wrote the files, read by path."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from mptkit.cli import main as mptkit_main
from mptkit.loading import HubError, HubRepo, load

from .fake_hub import FakeHub, Repo, repo_from_directory
from .hub_checkpoints import hub_fields, write_cached_repo, write_hub_checkpoint
from .train_support import INSTRUCT_YAML, REPO, free_port

SMALL = {"d_model": 64, "n_heads": 4, "n_layers": 2}
# The published repositories (MPT.md's configs at a small shape): mpt-30b's repo has left the hub,
# its config shape stays.
PUBLISHED = {
    "mosaicml/mpt-7b": hub_fields(**SMALL),
    "mosaicml/mpt-7b-instruct": hub_fields(**SMALL),
    "mosaicml/mpt-7b-chat": hub_fields(**SMALL),
    "mosaicml/mpt-7b-storywriter": hub_fields(**SMALL, max_seq_len=65536,
                                              attn_config={"alibi_bias_max": 16, "clip_qkv": 6.0}),
    "mosaicml/mpt-30b": hub_fields(**SMALL, max_seq_len=8192),
}
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKENS = torch.tensor([[510, 3158, 8516, 30013, 27287, 689, 253, 22658, 4370, 15]])


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Each published layout written once (sharded .bin + index, hub config fields, tokenizer), and
    an offline hub cache holding them; returns (cache, {name: (files directory, writer's logits)})."""
    root = tmp_path_factory.mktemp("hub")
    cache, repos = root / "cache", {}
    for seed, (name, fields) in enumerate(PUBLISHED.items()):
        files = root / "files" / name.replace("/", "--")
        model = write_hub_checkpoint(files, fields, seed=seed)
        with torch.no_grad():
            repos[name] = (files, model(TOKENS).logits)
        write_cached_repo(cache, name, files, COMMIT)
    return cache, repos


@pytest.fixture
def offline(published, monkeypatch):
    cache, repos = published
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache, repos


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("name", PUBLISHED)
def test_each_published_layout_loads_by_name_offline_as_by_path(offline, name):
    _, repos = offline
    files, written = repos[name]
    by_name = load(name, dtype="float32")
    assert isinstance(by_name.source, HubRepo) and by_name.source.reference == f"{name}@{COMMIT}"
    torch.testing.assert_close(_logits(by_name.model), _logits(load(files, dtype="float32").model), rtol=0, atol=0)
    torch.testing.assert_close(_logits(by_name.model), written, rtol=1e-5, atol=1e-5)
    assert by_name.model.config.max_seq_len == PUBLISHED[name]["max_seq_len"]


def test_storywriter_by_name_takes_a_longer_context(offline):
    loaded = load("mosaicml/mpt-7b-storywriter@" + COMMIT, dtype="float32", max_seq_len=83968)
    assert loaded.model.config.max_seq_len == 83968 and loaded.model.config.attn.clip_qkv == 6.0


def test_generate_chat_eval_and_export_take_names(offline, tmp_path, capsys, monkeypatch):
    assert mptkit_main(["generate", "mosaicml/mpt-7b-instruct", "--prompt", "Hi", "--max-new-tokens", "3",
                        "--dtype", "float32"]) == 0
    assert "--template instruct (from the model's name" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))
    assert mptkit_main(["chat", "mosaicml/mpt-7b-chat", "--max-new-tokens", "3", "--dtype", "float32"]) == 0
    text = tmp_path / "doc.txt"
    text.write_text("The printing press changed how books were made and read. " * 20)
    assert mptkit_main(["eval", "perplexity", "mosaicml/mpt-7b", str(text), "--seq-len", "64", "--quiet"]) == 0
    assert mptkit_main(["export", "mosaicml/mpt-30b", str(tmp_path / "hf")]) == 0
    assert "mosaicml/mpt-30b@" + COMMIT in (tmp_path / "hf" / "README.md").read_text()  # the card names the commit
    assert mptkit_main(["export", "mosaicml/mpt-7b", str(tmp_path / "gguf") + "/", "--format", "gguf",
                        "--outtype", "f32"]) == 0
    assert (tmp_path / "gguf" / "model-f32.gguf").is_file()


def test_a_missing_name_is_one_line_saying_offline(offline, capsys):
    assert mptkit_main(["generate", "mosaicml/mpt-7b-8k", "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not in the hub cache" in err and "HF_HUB_OFFLINE is set" in err


def test_serve_takes_a_name(offline, tmp_path):
    cache, _ = offline
    port = free_port()
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    server = subprocess.Popen([sys.executable, "-m", "mptkit.cli", "serve", "mosaicml/mpt-7b", "--port", str(port),
                               "--no-compile", "--dtype", "float32"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.5)
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                            json={"model": "m", "prompt": "Hello", "max_tokens": 3, "temperature": 0}).json()
        assert answer["usage"]["completion_tokens"] >= 1
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def _lora_run(out: Path, steps: int) -> list[str]:
    """A LoRA run of the instruct recipe on mosaicml/mpt-7b by name, cut to seconds."""
    settings = {"output_dir": out, "model.init_from": "mosaicml/mpt-7b", "lora.rank": 2, "train.max_steps": steps,
                "train.global_batch_size": 2, "train.micro_batch_size": 2, "train.seq_len": 128,
                "train.precision": "fp32", "schedule.warmup_steps": 1, "checkpoint.interval": 1,
                "data.train": f"[{REPO / 'data/instruct/hh-helpful-base-eval.jsonl'}]", "data.val": "[]",
                "logging.progress_bar": "false", "logging.tensorboard": "false", "logging.loss_curve_png": "false"}
    return ["train", str(INSTRUCT_YAML), *(f"{key}={value}" for key, value in settings.items())]


def test_a_run_from_a_name_records_its_commit_and_resumes_from_it(offline, tmp_path):
    """model.init_from by name; LoRA, so that the base is read again on resume. The name is then moved
    to another commit: the resumed run and its checkpoints keep the one it started from."""
    cache, repos = offline
    out = tmp_path / "run"
    assert mptkit_main(_lora_run(out, steps=2)) == 0
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (adapter["base_model_name_or_path"], adapter["revision"]) == ("mosaicml/mpt-7b", COMMIT)
    write_cached_repo(cache, "mosaicml/mpt-7b", repos["mosaicml/mpt-7b-chat"][0], "f" * 40)  # the name moves
    try:
        assert load("mosaicml/mpt-7b").source.commit == "f" * 40
        assert mptkit_main(_lora_run(out, steps=3)) == 0
        assert load(out / "checkpoints").source.lora_base().reference == f"mosaicml/mpt-7b@{COMMIT}"
    finally:
        (cache / "models--mosaicml--mpt-7b" / "refs" / "main").write_text(COMMIT)
    # the adapter published on the hub: --adapter and export --merge-lora take its name
    write_cached_repo(cache, "acme/mpt-7b-lora", out / "adapter", "b" * 40)
    merged = load("mosaicml/mpt-7b", dtype="float32", adapter=out / "adapter")
    assert torch.equal(_logits(load("mosaicml/mpt-7b", dtype="float32", adapter="acme/mpt-7b-lora").model),
                       _logits(merged.model))
    assert mptkit_main(["export", "mosaicml/mpt-7b", str(tmp_path / "merged"), "--merge-lora", "acme/mpt-7b-lora"]) == 0
    torch.testing.assert_close(_logits(load(tmp_path / "merged", dtype="float32").model), _logits(merged.model))


# ---- downloads over HTTP -----------------------------------------------------------------------------


@pytest.fixture
def hub(published, tmp_path, monkeypatch):
    """A fake hub holding mosaicml/mpt-7b with both weight formats and its Python files, a private
    copy, and a GPT-2 repo; an empty cache; the network's settings pointing at them."""
    _, repos = published
    files = repos["mosaicml/mpt-7b"][0]
    model = repo_from_directory(files, branches={"v1": "1" * 40})
    model.files["modeling_mpt.py"] = b"raise SystemExit('remote code must not be fetched')\n"
    from safetensors.torch import save_file

    state = {k: v for shard in sorted(files.glob("*.bin")) for k, v in torch.load(shard, weights_only=True).items()}
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    model.files["model.safetensors"] = (tmp_path / "model.safetensors").read_bytes()
    gpt2 = Repo({"config.json": json.dumps({"model_type": "gpt2"}).encode(), "model.safetensors": b"x"})
    with FakeHub({"mosaicml/mpt-7b": model, "acme/private-mpt": Repo(dict(model.files), token="sesame"),
                  "openai-community/gpt2": gpt2}) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield fake, tmp_path / "cache", state


def test_a_download_fetches_only_what_mptkit_reads_and_is_cached(hub, monkeypatch):
    fake, cache, state = hub
    loaded = load("mosaicml/mpt-7b", dtype="float32")
    fetched = sorted(path.split("/")[-1] for path in fake.served)
    offered = set(fake.repos["mosaicml/mpt-7b"].files)
    assert {"pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin", "modeling_mpt.py"} <= offered
    # one weights format (safetensors), the config and tokenizer files; no .bin, no Python files
    assert fetched == sorted(name for name in offered if name.endswith((".json", ".jinja", ".safetensors"))
                             and not name.startswith("pytorch_model"))
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert loaded.source.commit == fake.repos["mosaicml/mpt-7b"].commit
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # in the cache now: read without the network
    served = len(fake.served)
    assert load("mosaicml/mpt-7b", dtype="float32").source.path == loaded.source.path and len(fake.served) == served


def test_a_revision_resolves_to_its_commit(hub):
    fake, _, _ = hub
    assert load("mosaicml/mpt-7b@v1", dtype="float32").source.commit == "1" * 40
    assert load("mosaicml/mpt-7b", revision="v1", dtype="float32").source.reference == "mosaicml/mpt-7b@" + "1" * 40


@pytest.mark.parametrize("name, expected", [
    ("mosaicml/mpt-7b@v9", "has no revision 'v9'"),
    ("acme/private-mpt", "no such model on the hub (if it is private, set HF_TOKEN)"),
    ("acme/nothing", "no such model on the hub"),
    ("openai-community/gpt2", "a gpt2 model (config.json model_type), not MPT"),
])
def test_hub_failures_are_one_clear_line(hub, capsys, name, expected):
    with pytest.raises(HubError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load(name)
    assert mptkit_main(["generate", name, "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err.strip()  # download progress bars, if any, then the one line
    assert "Traceback" not in err and expected in err.splitlines()[-1]


def test_a_private_repo_downloads_with_its_token(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "sesame")
    assert load("acme/private-mpt", dtype="float32").source.reference.startswith("acme/private-mpt@")


def test_an_unreachable_hub_says_so(hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(HubError, match="cannot be reached"):
        load("mosaicml/mpt-7b")


def test_a_download_that_does_not_fit_is_refused_before_it_starts(hub, tmp_path, monkeypatch):
    fake, _, _ = hub
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        monkeypatch.setenv("HF_HUB_CACHE", str(small))
        with pytest.raises(HubError, match=r"needs .* free"):
            load("mosaicml/mpt-7b")
        assert fake.served == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
    shutil.rmtree(small, ignore_errors=True)
