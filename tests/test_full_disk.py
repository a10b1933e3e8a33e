"""A full disk, for real: each writer fills a size-limited tmpfs (mounted here; the tests run as root)
until the kernel answers ENOSPC, and must fail with one line naming the path, that the disk is full
and about how much it needed; nothing half-written is left to be trusted, and what was complete stays."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from mptkit.files import DiskFullError
from mptkit.loading import latest_checkpoint, list_checkpoints
from mptkit.model import MPTConfig, MPTForCausalLM

from .train_support import PRETRAIN_YAML, REPO, pretrain_overrides

MIB = 1 << 20


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of a given size; unmounted after the test."""
    mounted = []

    def mount(megabytes: int):
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): needs root")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


def _no_temporaries(directory) -> bool:
    return not [p for p in directory.rglob("*") if p.name.startswith(".tmp-")]


def _one_line_full(error: Exception, path) -> None:
    message = str(error)
    assert "\n" not in message and message.startswith(f"{path}: the disk is full (writing it needs about ")


def test_training_checkpoints_on_a_full_disk_stop_with_one_line_and_resume_bitwise_once_there_is_room(
        small_disk, tmp_path):
    from mptkit.train.config import load_run
    from mptkit.train.loop import train

    settings = {"checkpoint.interval": 1, "train.device": "cpu"}
    reference = train(load_run(PRETRAIN_YAML, pretrain_overrides(tmp_path / "reference", steps=3, **settings)))
    # A tiny run's checkpoint (weights + two Adam moments, fp32) takes ~40 MiB: one fits in 60, two do not.
    disk = small_disk(60)
    overrides = pretrain_overrides(tmp_path / "out", steps=3, **settings, **{"checkpoint.dir": disk / "ckpt"})
    with pytest.raises(DiskFullError) as info:
        train(load_run(PRETRAIN_YAML, overrides))
    _one_line_full(info.value, disk / "ckpt" / "step_00000002")
    assert [p.name for p in list_checkpoints(disk / "ckpt")] == ["step_00000001"]
    assert latest_checkpoint(disk / "ckpt").name == "step_00000001" and _no_temporaries(disk)
    # Room made (the filesystem grown), the same command resumes from step 1 as if nothing had happened.
    subprocess.run(["mount", "-o", "remount,size=200m", "tmpfs", str(disk)], check=True)
    resumed = train(load_run(PRETRAIN_YAML, overrides))
    assert resumed.losses == {step: reference.losses[step] for step in (2, 3)}


def test_mptkit_train_says_the_disk_is_full_in_one_line(small_disk, tmp_path, capsys):
    from mptkit.train.commands import main

    disk = small_disk(20)  # not even the first checkpoint fits
    overrides = pretrain_overrides(tmp_path / "out", steps=1, **{"checkpoint.dir": disk / "ckpt", "train.device": "cpu",
                                                                 "schedule.warmup_steps": 1})
    assert main("train", [str(PRETRAIN_YAML), *overrides]) == 1
    err = capsys.readouterr().err  # after the tokenizer's progress bar: one line, no traceback
    assert "Traceback" not in err and err.endswith("\n") and err.rstrip("\n").rpartition("\n")[2].startswith(
        f"mptkit train: {disk / 'ckpt' / 'step_00000001'}: the disk is full (writing it needs about ")
    assert list_checkpoints(disk / "ckpt") == [] and _no_temporaries(disk)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-hf")
    torch.manual_seed(0)
    MPTForCausalLM(MPTConfig.from_preset("tiny", max_seq_len=128)).save_pretrained(directory)
    return directory


def test_an_hf_export_on_a_full_disk_leaves_the_earlier_export_whole(small_disk, tiny_hf):
    from mptkit.export.hf import export_hf

    disk = small_disk(20)  # one export (~13 MiB of fp32 weights) fits, a second beside it does not
    export_hf(tiny_hf, disk / "out", with_tokenizer=False)
    before = {p.name: p.read_bytes() for p in (disk / "out").iterdir()}
    with pytest.raises(DiskFullError) as info:
        export_hf(tiny_hf, disk / "out", with_tokenizer=False)
    _one_line_full(info.value, disk / "out")
    assert {p.name: p.read_bytes() for p in (disk / "out").iterdir()} == before and _no_temporaries(disk)


def test_a_gguf_export_on_a_full_disk_leaves_no_file(small_disk, tiny_hf):
    pytest.importorskip("gguf")
    from mptkit.export.gguf import export_gguf

    disk = small_disk(4)
    with pytest.raises(DiskFullError) as info:
        export_gguf(tiny_hf, disk / "model.gguf", outtype="f32")
    _one_line_full(info.value, disk / "model.gguf")
    assert list(disk.iterdir()) == []


def test_data_shards_on_a_full_disk_keep_the_complete_shards_and_write_no_index(small_disk):
    from mptkit.data.prepare import prepare_pretraining
    from mptkit.data.shards import INDEX_FILE

    disk = small_disk(1)
    with pytest.raises(DiskFullError) as info:
        prepare_pretraining([REPO / "data/books/train"], disk / "shards", seq_len=64, samples_per_shard=512,
                            progress=False)
    assert "the disk is full (writing it needs about " in str(info.value) and "\n" not in str(info.value)
    names = sorted(p.name for p in (disk / "shards").iterdir())
    assert INDEX_FILE not in names and _no_temporaries(disk)
    progress = json.loads((disk / "shards" / "progress.json").read_text())
    assert [s["file"] for s in progress["shards"]] == [n for n in names if n.startswith("shard-")]


def test_a_published_adapter_on_a_full_disk_leaves_the_earlier_one_whole(small_disk, tmp_path):
    from mptkit.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHECKPOINT_ADAPTER_DIR
    from mptkit.train.lora import publish_adapter

    checkpoint = tmp_path / "step_00000001"
    (checkpoint / CHECKPOINT_ADAPTER_DIR).mkdir(parents=True)
    (checkpoint / CHECKPOINT_ADAPTER_DIR / ADAPTER_CONFIG).write_text("{}")
    (checkpoint / CHECKPOINT_ADAPTER_DIR / ADAPTER_WEIGHTS).write_bytes(os.urandom(600 * 1024))
    disk = small_disk(1)  # one adapter of 600 KiB fits, a second beside it does not
    publish_adapter(checkpoint, disk)
    before = (disk / CHECKPOINT_ADAPTER_DIR / ADAPTER_WEIGHTS).read_bytes()
    with pytest.raises(DiskFullError) as info:
        publish_adapter(checkpoint, disk)
    _one_line_full(info.value, disk / CHECKPOINT_ADAPTER_DIR)
    assert (disk / CHECKPOINT_ADAPTER_DIR / ADAPTER_WEIGHTS).read_bytes() == before and _no_temporaries(disk)


def test_staged_writes_a_directory_whole_into_the_current_one(tmp_path, monkeypatch):
    from mptkit.files import staged

    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "kept.txt").write_text("earlier")
    monkeypatch.chdir(tmp_path / "here")
    with staged(Path("."), needed=2) as temp:
        temp.mkdir()
        (temp / "new.txt").write_text("ok")
    assert {p.name: p.read_text() for p in (tmp_path / "here").iterdir()} == {"kept.txt": "earlier", "new.txt": "ok"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


def test_a_trained_tokenizer_on_a_full_disk_leaves_no_directory(small_disk):
    from mptkit.data.tokenizer import train_tokenizer

    disk = small_disk(1)
    (disk / "filler").write_bytes(b"\0" * (1024 - 16) * 1024)  # 16 KiB left: less than one tokenizer.json
    with pytest.raises(DiskFullError) as info:
        train_tokenizer([str(REPO / "data/books/heldout")], 400, disk / "tok", progress=False)
    _one_line_full(info.value, disk / "tok")
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]

