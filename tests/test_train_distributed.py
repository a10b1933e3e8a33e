"""FSDP2 over 2 CPU ranks (gloo) against one process with the same global batch.

Both runs see the same samples at every step (the data split is world-size independent) and start
from the same weights (initialised on CPU on rank 0, then sharded), so they differ only by float
summation order: fp32 losses must agree to 1e-4 absolute (observed: ~2e-6 over these steps; a
wrong gradient scale or a missing reduction shows up at 1e-2 or more from step 2 on).
"""

import subprocess
import sys

import pytest

from mptkit.loading import latest_checkpoint, list_checkpoints

from .train_support import PRETRAIN_YAML, REPO, logged_losses, pretrain_overrides, start_mptkit, start_ranks

STEPS = 4
TOLERANCE = 1e-4


def _argv(output_dir, micro_batch_size: int, eval_micro_batch_size: int, *extra: str) -> list[str]:
    overrides = pretrain_overrides(output_dir, steps=STEPS, **{
        "train.precision": "fp32", "train.micro_batch_size": micro_batch_size, "checkpoint.interval": 2,
        "data.val": f"[{REPO / 'data/books/heldout/pg11.txt.gz'}]", "eval.max_batches": 2,
        "eval.micro_batch_size": eval_micro_batch_size})
    return ["train", str(PRETRAIN_YAML), *overrides, *extra]


def _val_losses(output_dir):
    import json

    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["val_loss"] for row in rows if "val_loss" in row}


def test_two_ranks_match_one_process_and_their_checkpoint_resumes_in_one(tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    # Global batch 4: one process takes micro-batches of 4; each of 2 ranks takes 2 micro-batches of
    # 1 (gradient accumulation, with FSDP's reduce-scatter only on the last one).
    one = start_mptkit(_argv(single, 4, 4), tmp_path / "single.log")
    ranks = start_ranks(_argv(sharded, 1, 2), 2, tmp_path)
    for process in [one, *ranks]:
        process.join(timeout=300)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.log")))
    assert [p.exitcode for p in [one, *ranks]] == [0, 0, 0], logs
    assert "2 rank(s) on cpu" in (tmp_path / "rank0.log").read_text()

    expected, got = logged_losses(single), logged_losses(sharded)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=TOLERANCE), f"step {step}"
    assert _val_losses(sharded)[STEPS] == pytest.approx(_val_losses(single)[STEPS], abs=TOLERANCE)

    # The 2-rank checkpoint is sharded (one file per rank) and reshards on load: resumed at step 2
    # in one process, the run continues on the single-process trajectory.
    step2 = list_checkpoints(sharded / "checkpoints")[0]
    assert step2.name == "step_00000002" and len(list(step2.glob("*.distcp"))) == 2
    resumed = tmp_path / "resumed"
    one = start_mptkit(_argv(resumed, 4, 4, f"checkpoint.resume={step2}"), tmp_path / "resumed.log")
    one.join(timeout=300)
    assert one.exitcode == 0, (tmp_path / "resumed.log").read_text()
    after = logged_losses(resumed)
    assert sorted(after) == [3, 4]
    for step in after:
        assert after[step] == pytest.approx(expected[step], abs=TOLERANCE), f"step {step} after resharding"
    assert latest_checkpoint(resumed / "checkpoints").name == f"step_{STEPS:08d}"


@pytest.mark.slow
def test_torchrun_two_ranks_bf16_with_activation_checkpointing(tmp_path):
    """The documented launch itself: torchrun, bf16 autocast + FSDP2 mixed precision, recompute."""
    extra = ["train.precision=bf16", "train.activation_checkpointing=true"]
    single = subprocess.run([sys.executable, "-m", "mptkit.cli", *_argv(tmp_path / "single", 4, 4, *extra)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout + single.stderr
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "mptkit.cli",
         *_argv(tmp_path / "sharded", 1, 2, *extra)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    expected, got = logged_losses(tmp_path / "single"), logged_losses(tmp_path / "sharded")
    for step in expected:  # bf16 rounding differs with the micro-batch shapes: a looser bound
        assert got[step] == pytest.approx(expected[step], abs=2e-2), f"step {step}"
