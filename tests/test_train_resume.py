"""Exact resumption: a run killed with SIGKILL (mid-step or mid-save) and resumed logs bitwise the same
losses at every later step as an uninterrupted run (fp32, one process, CPU).

Every run is its own process (forked from the same clean forkserver, one thread each), so the
killed, resumed and reference runs compute in the same environment.
"""

import signal
import time

import pytest

from mptkit.loading import is_checkpoint, latest_checkpoint

from .train_support import PRETRAIN_YAML, logged_losses, pretrain_overrides, start_mptkit

STEPS = 6


def _argv(output_dir) -> list[str]:
    overrides = pretrain_overrides(output_dir, steps=STEPS, **{
        "train.precision": "fp32", "checkpoint.interval": 2, "checkpoint.keep_last_n": 2})
    return ["train", str(PRETRAIN_YAML), *overrides]


def _run(output_dir, patch=None):
    process = start_mptkit(_argv(output_dir), output_dir.with_suffix(".log"), patch=patch)
    process.join(timeout=240)
    return process.exitcode, output_dir.with_suffix(".log").read_text()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Losses of the uninterrupted run; it runs beside the first test's victim."""
    out = tmp_path_factory.mktemp("reference") / "run"
    process = start_mptkit(_argv(out), out.with_suffix(".log"))

    def losses() -> dict[int, float]:
        process.join(timeout=240)
        assert process.exitcode == 0, out.with_suffix(".log").read_text()
        found = logged_losses(out)
        assert sorted(found) == list(range(1, STEPS + 1))
        return found

    yield losses
    if process.is_alive():
        process.kill()


def _step_of(checkpoint) -> int:
    return int(checkpoint.name.split("_")[1])


def test_sigkill_mid_run_then_resume_gives_bitwise_identical_losses(reference, tmp_path):
    out = tmp_path / "run"
    victim = start_mptkit(_argv(out), tmp_path / "victim.log")
    deadline = time.monotonic() + 240
    logged = {}
    while max(logged, default=0) < 3:  # past the first checkpoint (step 2)
        assert victim.is_alive(), "the run ended before it could be killed:\n" + (tmp_path / "victim.log").read_text()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.01)
        if (out / "metrics.jsonl").exists():
            logged = logged_losses(out)
    victim.kill()  # SIGKILL
    victim.join()
    assert victim.exitcode == -signal.SIGKILL
    killed = logged_losses(out)
    saved = latest_checkpoint(out / "checkpoints")
    assert saved is not None and _step_of(saved) < STEPS

    exitcode, log = _run(out)
    assert exitcode == 0, log
    assert f"resuming from {saved} at step {_step_of(saved)}" in log
    expected = reference()
    after_resume = logged_losses(out)
    assert sorted(after_resume) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert after_resume[step] == expected[step], f"step {step}"  # bitwise: no tolerance
    for step, loss in killed.items():
        assert loss == expected[step], f"step {step} before the kill"


def crash_inside_the_second_checkpoint_write():
    """Wrap DCP's file writer: during the second save (step 4) the process kills itself after the
    shard files are written and before DCP writes .metadata."""
    import os

    import torch.distributed.checkpoint as dcp

    write_data = dcp.FileSystemWriter.write_data
    saves = []

    def write_then_die_on_second_save(self, plan, planner):
        written = write_data(self, plan, planner)
        saves.append(plan)
        if len(saves) == 2:
            written.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return written

    dcp.FileSystemWriter.write_data = write_then_die_on_second_save


def test_crash_while_saving_leaves_the_previous_checkpoint_loadable(reference, tmp_path):
    out = tmp_path / "run"
    exitcode, log = _run(out, patch=crash_inside_the_second_checkpoint_write)
    assert exitcode == -signal.SIGKILL, log
    checkpoints = out / "checkpoints"
    partial = checkpoints / ".tmp-step_00000004"
    assert list(partial.glob("*.distcp")) and not is_checkpoint(partial)  # died mid-save
    assert latest_checkpoint(checkpoints).name == "step_00000002"

    exitcode, log = _run(out)
    assert exitcode == 0, log
    assert "step_00000002 at step 2" in log
    assert not partial.exists()  # the incomplete save was cleaned up
    expected = reference()
    after = logged_losses(out)
    assert {step: after[step] for step in range(3, STEPS + 1)} == {s: expected[s] for s in range(3, STEPS + 1)}
