"""The commands a user runs first, run as written: the README's quickstart (Python and shell) and
each config file's header commands. Training commands get small step counts as overrides; nothing
else is changed except the server's port (a free one) and how long it is kept up. Commands that
need what this machine lacks (GPUs, several nodes, prepared 2048-token data) must say so."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Appended to every `mptkit train` line: a couple of steps instead of hundreds.
QUICK_TRAIN = ["train.max_steps=2", "schedule.warmup_steps=0", "eval.max_batches=2"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def _code_blocks(markdown: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", markdown, re.S)


def readme_shell_commands() -> list[str]:
    """The README's `mptkit` lines, those on hub names included."""
    lines = []
    for block in _code_blocks((REPO / "README.md").read_text(), "bash"):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith("mptkit "):
                lines.append(line)
    return lines


def config_header_commands(path: Path) -> list[str]:
    """`#   mptkit ...` / `#   torchrun ...` lines at the top of a config, continuations joined."""
    commands, pending = [], ""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        text = re.sub(r"\s+#\s.*$", "", text)
        if pending:
            pending += " " + text.rstrip("\\").strip()
            if not text.endswith("\\"):
                commands.append(pending)
                pending = ""
        elif re.match(r"^(mptkit|torchrun) ", text) or re.match(r"^[\w ]+:\s+(mptkit|torchrun) ", text):
            text = re.sub(r"^[\w ]+:\s+", "", text)
            if text.endswith("\\"):
                pending = text.rstrip("\\").strip()
            else:
                commands.append(text)
    return commands


def _workspace(tmp_path: Path) -> Path:
    """A directory laid out like a clone: data/ and configs/ from the repo, out/ empty."""
    for name in ("data", "configs"):
        (tmp_path / name).symlink_to(REPO / name)
    return tmp_path


def _argv(command: str) -> list[str]:
    argv = shlex.split(command)
    if argv[0] == "mptkit":
        argv = [sys.executable, "-m", "mptkit", *argv[1:]]
    elif argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    if "train" in argv:
        argv += QUICK_TRAIN
    return argv


def run_documented(command: str, cwd: Path, stdin: str = "", timeout: int = 1800) -> str:
    done = subprocess.run(_argv(command), cwd=cwd, input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=ENV)
    assert done.returncode == 0, f"`{command}` failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve_answers(command: str, cwd: Path, model_name: bytes = b"tiny-hf", env: dict = ENV) -> None:
    port = _free_port()
    argv = _argv(re.sub(r"--port \d+", f"--port {port}", command))
    server = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as response:
                    assert model_name in response.read()
                    return
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"`{command}` did not come up:\n{server.stdout.read()[-3000:]}") from None
                time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow  # ~15 minutes on 2 shared cores: most of it is the extrapolation sweep over a whole book
def test_the_readme_quickstart_and_config_headers_run_as_written(tmp_path):
    """README first (its tiny pretraining and instruct runs are also tiny.yaml's and instruct.yaml's
    header commands), then the remaining header commands: chat.yaml, instruct-lora.yaml, and
    tiny.yaml's two-process FSDP2 command as a fresh run over the same shards."""
    cwd = _workspace(tmp_path)
    python_blocks = _code_blocks((REPO / "README.md").read_text(), "python")
    assert len(python_blocks) >= 2
    for block in python_blocks[:2]:  # build and save a tiny MPT, then load it with the model-card code
        done = subprocess.run([sys.executable, "-c", block], cwd=cwd, capture_output=True, text=True, timeout=300,
                              env=ENV)
        assert done.returncode == 0, f"README python block failed:\n{block}\n{done.stderr[-3000:]}"

    commands = [c for c in readme_shell_commands() if "mosaicml/" not in c]  # names: the test below
    assert [c.split()[1] for c in commands] == ["data", "train", "train", "export", "generate", "chat", "serve",
                                                "eval", "eval"]
    for command in commands:
        if command.startswith("mptkit serve"):
            _serve_answers(command, cwd)
        elif command.startswith("mptkit chat"):
            assert run_documented(command, cwd, stdin="Hello there\n/exit\n").strip()
        else:
            run_documented(command, cwd)
    assert (cwd / "out/shards/index.json").is_file() and (cwd / "out/tiny-hf/config.json").is_file()

    tiny = config_header_commands(REPO / "configs/pretrain/tiny.yaml")
    instruct = config_header_commands(REPO / "configs/finetune/instruct.yaml")
    assert tiny[0] in commands and instruct == [commands[2]]
    for command in config_header_commands(REPO / "configs/finetune/chat.yaml"):
        run_documented(command, cwd)
    assert (cwd / "out/tiny-chat/checkpoints").is_dir()
    for command in config_header_commands(REPO / "configs/finetune/instruct-lora.yaml"):
        run_documented(command, cwd)
    assert (cwd / "out/tiny-instruct-lora/adapter/adapter_config.json").is_file()
    assert len(tiny) == 2 and tiny[1].startswith("torchrun --nproc_per_node=2")
    shutil.rmtree(cwd / "out/tiny-pretrain/checkpoints")  # keep the tokenized shards, train afresh
    run_documented(tiny[1], cwd)
    assert (cwd / "out/tiny-pretrain/checkpoints/step_00000002/.metadata").is_file()


def test_the_readme_commands_on_hub_names_run_against_an_offline_cache(tmp_path):
    """The quickstart's `mptkit generate/serve mosaicml/...` lines, run as written with HF_HUB_OFFLINE=1
    against a hub cache holding tiny models in the published layout (tests/hub_checkpoints.py)."""
    from .hub_checkpoints import hub_fields, write_cached_repo, write_hub_checkpoint

    commands = [c for c in readme_shell_commands() if "mosaicml/" in c]
    assert [c.split()[1] for c in commands] == ["generate", "serve"]
    cache = tmp_path / "cache"
    for name in {c.split()[2] for c in commands}:
        files = tmp_path / name.replace("/", "--")
        write_hub_checkpoint(files, hub_fields(d_model=64, n_heads=4, n_layers=2, max_seq_len=512))
        write_cached_repo(cache, name, files, "a" * 40)
    env = {**ENV, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    for command in commands:
        if command.startswith("mptkit serve"):
            _serve_answers(command, tmp_path, model_name=b"mpt-7b-chat", env=env)
        else:
            done = subprocess.run(_argv(command), cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
            assert done.returncode == 0 and done.stdout.strip(), done.stderr[-3000:]
            assert "--template instruct" in done.stderr


@pytest.mark.parametrize("config", ["pretrain/125m.yaml", "pretrain/1b.yaml", "pretrain/7b.yaml",
                                    "finetune/storywriter.yaml", "finetune/mpt-7b-instruct-lora.yaml"])
def test_gpu_configs_say_what_they_need(config):
    path = REPO / "configs" / config
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    commands = config_header_commands(path)
    assert any(c.startswith("torchrun") for c in commands), commands
    assert re.search(r"\bGPUs?\b", header), f"{config}: its header should say it needs GPUs"
