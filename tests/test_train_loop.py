"""Tiny end-to-end runs from the example configs: pretraining, instruct fine-tuning, export, the
loss arithmetic of a step, and the NaN/spike policy."""

import json
import math

import pytest
import torch
from transformers import MptForCausalLM

from mptkit.export.hf import export_hf
from mptkit.loading import latest_checkpoint, list_checkpoints, load_dcp_model_weights
from mptkit.model import MPTConfig, MPTForCausalLM
from mptkit.train.config import load_run
from mptkit.train.loop import (
    AnomalyPolicy,
    LossWatch,
    StepStats,
    TrainingHalted,
    build_training_state,
    cross_entropy_sum,
    target_count,
    train,
    train_step,
)

from .train_support import INSTRUCT_YAML, PRETRAIN_YAML, pretrain_overrides

INSTRUCT_TRAIN = "data/instruct/hh-helpful-base-eval.jsonl"  # the small file: 100 rows load fast


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The tiny pretraining example, 6 steps, with validation, checkpoints, TensorBoard and the PNG."""
    out = tmp_path_factory.mktemp("tiny-pretrain")
    overrides = pretrain_overrides(out, steps=6, **{
        "data.val": "[data/books/heldout/pg11.txt.gz]", "eval.interval": 3, "eval.max_batches": 2,
        "checkpoint.interval": 2, "checkpoint.keep_last_n": 2,
        "logging.tensorboard": "true", "logging.loss_curve_png": "true"})
    result = train(load_run(PRETRAIN_YAML, overrides))
    return out, result


def test_tiny_pretraining_from_the_example_config(pretrained):
    out, result = pretrained
    assert result.step == 6 and sorted(result.losses) == [1, 2, 3, 4, 5, 6]
    losses = list(result.losses.values())
    # From about ln(50432) + init noise, the loss must fall well within six AdamW steps at lr 3e-3.
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.5
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert {"lr", "grad_norm", "tokens_per_s", "mfu", "tokens_seen"} <= set(train_rows[0])
    assert train_rows[-1]["tokens_seen"] == 6 * 4 * 64
    assert [r["step"] for r in val_rows] == [3, 6]
    assert val_rows[-1]["val_ppl"] == pytest.approx(math.exp(val_rows[-1]["val_loss"]))
    assert result.val_loss == val_rows[-1]["val_loss"]
    # keep_last_n=2 of the checkpoints at steps 2, 4, 6
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000004", "step_00000006"]
    assert (out / "loss_curve.png").stat().st_size > 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_export_writes_a_directory_that_transformers_loads_with_the_same_logits(pretrained, tmp_path):
    out, _ = pretrained
    checkpoint = latest_checkpoint(out / "checkpoints")
    export_hf(out / "checkpoints", tmp_path / "hf")
    trained = MPTForCausalLM(MPTConfig.from_pretrained(tmp_path / "hf"))
    load_dcp_model_weights(trained, checkpoint)
    exported = MPTForCausalLM.from_pretrained(tmp_path / "hf")
    oracle = MptForCausalLM.from_pretrained(tmp_path / "hf")  # transformers' own implementation
    tokens = torch.randint(0, 50277, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained(tokens).logits
        torch.testing.assert_close(exported(tokens).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(oracle(tokens).logits, expected, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()

    # Training can start from either form of the same weights: the first loss is the same bits.
    first_losses = []
    for init_from in (tmp_path / "hf", checkpoint):
        run = load_run(PRETRAIN_YAML, pretrain_overrides(
            tmp_path / f"from-{init_from.name}", steps=1,
            **{"model.init_from": init_from, "train.precision": "fp32", "schedule.warmup_steps": 1}))
        first_losses.append(train(run).losses[1])
    assert first_losses[0] == first_losses[1]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_run_from_init_from_reads_the_source_once(pretrained, tmp_path, monkeypatch, lora):
    """Finding model.init_from on disk and reading its config happen once in a whole run (find_source
    counted in every mptkit module that holds it, config_fields on every kind of source), the LoRA
    base's identity included."""
    import sys

    import mptkit.loading as loading

    from mptkit.loading import sources

    calls = {"find_source": 0, "config_fields": 0}
    original_find = loading.find_source

    def counting_find(*args, **kwargs):
        calls["find_source"] += 1
        return original_find(*args, **kwargs)

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("mptkit") and getattr(module, "find_source", None) is original_find:
            monkeypatch.setattr(module, "find_source", counting_find)
    for kind in (sources.HFDirectory, sources.TrainingCheckpoint, sources.ComposerFile):
        def counting_fields(self, _original=kind.config_fields):
            calls["config_fields"] += 1
            return _original(self)

        monkeypatch.setattr(kind, "config_fields", counting_fields)
    out, _ = pretrained
    extra = {"model.init_from": out / "checkpoints", "train.device": "cpu", "schedule.warmup_steps": 1,
             **({"lora.rank": 2} if lora else {})}
    result = train(load_run(PRETRAIN_YAML, pretrain_overrides(tmp_path, steps=1, **extra)))
    assert result.step == 1 and (result.adapter is not None) == lora
    assert calls == {"find_source": 1, "config_fields": 1}


def test_tiny_instruct_finetuning_continues_the_pretrained_checkpoint(pretrained, tmp_path):
    out, _ = pretrained
    overrides = [
        f"data.train=[{INSTRUCT_TRAIN}]", "data.val=[]", "train.max_steps=3", "train.global_batch_size=4",
        "train.micro_batch_size=2", "train.seq_len=128", "schedule.warmup_steps=1", "checkpoint.interval=0",
        "logging.tensorboard=false", "logging.progress_bar=false", "logging.loss_curve_png=false",
        "logging.peak_tflops=1"]
    result = train(load_run(INSTRUCT_YAML, overrides + [f"model.init_from={out / 'checkpoints'}",
                                                           f"output_dir={tmp_path / 'tuned'}"]))
    assert result.step == 3 and all(math.isfinite(x) for x in result.losses.values())
    assert latest_checkpoint(tmp_path / "tuned" / "checkpoints").name == "step_00000003"
    # Starting from the pretrained weights, the first batch (the same one: same seed and data) costs
    # clearly less than from a fresh initialisation of the same preset.
    fresh = train(load_run(INSTRUCT_YAML, overrides + ["model.init_from=null", "model.preset=tiny",
                                                          "train.max_steps=1", f"output_dir={tmp_path / 'fresh'}"]))
    assert result.losses[1] < fresh.losses[1] - 0.3


def test_step_loss_is_the_token_mean_whatever_the_micro_batching():
    """The loop's (summed CE / target count) equals the model's own mean loss with -100 labels."""
    torch.manual_seed(0)
    model = MPTForCausalLM(MPTConfig.from_preset("tiny"))
    tokens = torch.randint(0, 50277, (3, 20))
    labels = tokens.clone()
    labels[0, :15] = -100  # prompt-masked rows with very different numbers of targets
    labels[2, :3] = -100
    with torch.no_grad():
        out = model(tokens, labels=labels)
        ours = cross_entropy_sum(out.logits, labels) / target_count(labels)
        # Two micro-batches of unequal size give the same token mean once summed.
        parts = [(model(tokens[s]).logits, labels[s]) for s in (slice(0, 1), slice(1, 3))]
        split = sum(cross_entropy_sum(lg, lb) for lg, lb in parts) / sum(target_count(lb) for _, lb in parts)
    assert int(target_count(labels)) == 5 + 19 + 17  # labels at positions 1..19 of each row
    torch.testing.assert_close(ours, out.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(split, out.loss, rtol=1e-6, atol=1e-6)


def test_loss_watch_flags_non_finite_values_and_spikes():
    watch = LossWatch(spike_factor=2.0, min_steps=3)
    assert "nan" in watch.problem(float("nan"), 1.0)
    assert "gradient norm is inf" in watch.problem(1.0, float("inf"))
    for loss in (3.0, 3.2, 2.8):
        assert watch.problem(loss, 1.0) is None
        watch.accept(loss)
    assert watch.problem(5.9, 1.0) is None
    assert "spiked above 2.0 x the recent mean 3.0000" in watch.problem(6.1, 1.0)
    assert LossWatch(spike_factor=0.0, min_steps=1, history=[1.0] * 5).problem(100.0, 1.0) is None


def test_a_diverging_run_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    # At lr 1e30 the first update blows the weights up: step 1's loss is fine, step 2's is NaN.
    overrides = pretrain_overrides(tmp_path / "stop", steps=10, **{
        "train.precision": "fp32", "schedule.name": "constant", "schedule.warmup_steps": 0,
        "optimizer.lr": 1e30, "checkpoint.interval": 1, "train.grad_clip_norm": "null"})
    with pytest.raises(TrainingHalted) as info:
        train(load_run(PRETRAIN_YAML, overrides))
    message = str(info.value)
    assert message.startswith("step 2: loss is nan; stopping (anomaly.policy=stop")
    assert "the last good checkpoint is" in message and "step_00000001" in message
    # Nothing saved after the bad step: the newest checkpoint is the last good one.
    assert latest_checkpoint(tmp_path / "stop" / "checkpoints").name == "step_00000001"
    rows = [json.loads(line) for line in (tmp_path / "stop" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and "halted" in rows[-1]

    # With policy skip the bad updates are skipped, and after max_consecutive_skips it stops too.
    overrides = pretrain_overrides(tmp_path / "skip", steps=10, **{
        "train.precision": "fp32", "schedule.name": "constant", "schedule.warmup_steps": 0,
        "optimizer.lr": 1e30, "anomaly.policy": "skip", "anomaly.max_consecutive_skips": 2})
    with pytest.raises(TrainingHalted, match=r"^step 4: .*3 bad step\(s\) in a row"):
        train(load_run(PRETRAIN_YAML, overrides))
    rows = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "skipped" in r] == [2, 3]


def test_the_training_step_runs_on_its_own_and_is_the_loops_own_step(tmp_path):
    """build_training_state + train_step (what a caller times) are the loop's parts: the same first loss bits."""
    settings = {"train.precision": "fp32", "schedule.warmup_steps": 1}
    first = train(load_run(PRETRAIN_YAML, pretrain_overrides(tmp_path / "loop", steps=1, **settings))).losses[1]
    state = build_training_state(load_run(PRETRAIN_YAML, pretrain_overrides(tmp_path / "step", steps=1, **settings)))
    stats = train_step(state)
    assert isinstance(stats, StepStats) and stats.step == state.step == 1 and stats.problem is None
    assert stats.loss == first
    assert stats.tokens == stats.tokens_seen == state.tokens_seen == 4 * 64
    assert stats.elapsed > 0 and stats.flops > 0 and stats.tokens_per_s == stats.tokens / stats.elapsed
    assert not (tmp_path / "step" / "checkpoints").exists()  # stepping saves nothing by itself


def test_anomaly_policy_skips_bad_steps_and_stops_after_too_many_in_a_row():
    from mptkit.train.config import AnomalyConfig

    def stats(step, problem=None):
        return StepStats(step=step, loss=1.0, grad_norm=1.0, lr=1e-3, tokens=1, tokens_seen=step, flops=1,
                         elapsed=1.0, problem=problem)

    policy = AnomalyPolicy(AnomalyConfig(policy="skip", max_consecutive_skips=2))
    verdicts = [policy.review(stats(step, None if step in (1, 4) else "loss is nan")) for step in range(1, 8)]
    assert verdicts == ["go", "skip", "skip", "go", "skip", "skip", "stop"]
    assert policy.skip_message(stats(6, "loss is nan")) == "[mptkit train] step 6: loss is nan; update skipped (3 in a row)"
    assert str(policy.halt(stats(7, "loss is nan"), None)) == (
        "step 7: loss is nan; stopping (anomaly.policy=skip, 3 bad step(s) in a row). Nothing was saved after the bad "
        "step: no checkpoint was saved yet. Resume from it with a lower optimizer.lr or with anomaly.policy=skip.")
    assert AnomalyPolicy(AnomalyConfig(policy="stop")).review(stats(1, "loss is inf")) == "stop"


def test_activation_checkpointing_reruns_each_block_in_backward_with_the_same_gradients():
    from mptkit.train.config import ParallelConfig, TrainConfig
    from mptkit.train.parallel import DistributedEnv, parallelize

    env = DistributedEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    ids = torch.randint(0, 50277, (2, 16), generator=torch.Generator().manual_seed(1))
    calls, grads = [], []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = MPTForCausalLM(MPTConfig.from_preset("tiny", max_seq_len=32))
        parallelize(model, TrainConfig(activation_checkpointing=recompute), ParallelConfig(), env).train()
        count = []
        for block in model.transformer.blocks:
            block.attn.register_forward_hook(lambda *_: count.append(1))
        model(ids, labels=ids).loss.backward()
        calls.append(len(count))
        grads.append({name: param.grad for name, param in model.named_parameters()})
    assert calls == [2, 4]  # two blocks; with recompute each attention runs again in backward
    assert all(torch.equal(grads[0][name], grads[1][name]) for name in grads[0])
