"""LoRA and QLoRA on a tiny frozen base: the adapters themselves, a LoRA run through the trainer, its
checkpoints (small, exact on resume, tied to their base), the PEFT format read by PEFT without
mptkit, merging, the --adapter loaders, FSDP2 over 2 ranks, and the int8 base on CPU.

The base is a seeded tiny MPT saved in the hub layout (remote code beside it), so that transformers
+ peft can read it as any MPT checkpoint. LoRA runs fine-tune it on the shipped instruct data.
"""

import json
import signal
import subprocess
import sys
import sysconfig
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mptkit.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FrozenLinear,
    LoraSpec,
    add_lora,
    merge_adapter,
)
from mptkit.cli import main as mptkit_main
from mptkit.data.tokenizer import load_tokenizer
from mptkit.loading import latest_checkpoint, load
from mptkit.model import MPTConfig, MPTForCausalLM
from mptkit.train.config import ConfigError, load_run
from mptkit.train.loop import build_training_state, forward_backward, train, train_step
from mptkit.train.parallel import DistributedEnv

from .train_support import INSTRUCT_YAML, REPO, free_port, logged_losses, start_mptkit

INSTRUCT_TRAIN = REPO / "data/instruct/hh-helpful-base-train.jsonl"
INSTRUCT_EVAL = REPO / "data/instruct/hh-helpful-base-eval.jsonl"  # 100 rows: loads fast
TOKENS = torch.randint(0, 50277, (2, 24), generator=torch.Generator().manual_seed(0))


def _save_base(directory, seed: int = 0):
    torch.manual_seed(seed)
    MPTForCausalLM(MPTConfig.from_preset("tiny", max_seq_len=128)).save_pretrained(directory, tokenizer=load_tokenizer())
    return directory


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny MPT in the hub layout (config.json, safetensors, modeling_mpt.py & co., tokenizer)."""
    return _save_base(tmp_path_factory.mktemp("lora-base") / "base")


def lora_overrides(output_dir, base, steps: int, **extra) -> list[str]:
    """The instruct recipe cut down to seconds: LoRA r=4 on the tiny base, 64-token examples, batch 4."""
    settings = {
        "output_dir": str(output_dir),
        "model.init_from": str(base),
        "lora.rank": 4,
        "lora.alpha": 8,
        "data.train": f"[{INSTRUCT_EVAL}]",
        "data.val": "[]",
        "train.max_steps": steps,
        "train.seq_len": 64,
        "train.global_batch_size": 4,
        "train.micro_batch_size": 2,
        "train.precision": "fp32",
        "optimizer.lr": 1e-2,
        "schedule.warmup_steps": 1,
        "checkpoint.interval": 0,
        "logging.interval": 1,
        "logging.progress_bar": "false",
        "logging.tensorboard": "false",
        "logging.loss_curve_png": "false",
        "logging.peak_tflops": 1.0,
    }
    settings.update(extra)
    return [f"{key}={value}" for key, value in settings.items()]


def _logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model.eval()(tokens).logits


# ---- the adapters ---------------------------------------------------------------------------------


def test_adapters_at_init_leave_logits_unchanged_and_freeze_the_base(base):
    model = MPTForCausalLM.from_pretrained(base)
    expected = _logits(model)
    add_lora(model, LoraSpec(rank=4))
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=0)  # lora_B starts at zero
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    # 2 blocks x 4 projections x (A, B), nothing else
    assert len(trainable) == 16 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def stepped(base, tmp_path_factory):
    """A LoRA run's state before and after 3 optimizer steps (in this process)."""
    out = tmp_path_factory.mktemp("stepped")
    state = build_training_state(load_run(INSTRUCT_YAML, lora_overrides(out, base, steps=3)))
    before = {name: p.detach().clone() for name, p in state.model.named_parameters()}
    position = state.train_stream.state_dict()
    forward_backward(state.model, state.train_stream.next_batch(), state.autocast, 1.0)
    state.train_stream.load_state_dict(position)
    with_grad = {name for name, p in state.model.named_parameters() if p.grad is not None}
    state.optimizer.zero_grad(set_to_none=True)
    losses = [train_step(state).loss for _ in range(3)]
    return state, before, with_grad, losses


def test_only_the_adapters_get_gradients_and_change(stepped):
    state, before, with_grad, _ = stepped
    trainable = {name for name, p in state.model.named_parameters() if p.requires_grad}
    assert with_grad == trainable and all("lora_" in name for name in trainable)
    for name, param in state.model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (name in trainable), name
    assert state.optimizer.param_groups[0]["params"] and all(
        p.requires_grad for group in state.optimizer.param_groups for p in group["params"])


def test_merged_logits_equal_the_adapted_models(stepped):
    state, _, _, _ = stepped
    model = state.model
    adapted = _logits(model)
    merged = merge_adapter(model)
    assert not any("lora_" in name or "base_layer" in name for name in merged.state_dict())
    assert type(merged.transformer.blocks[0].attn.Wqkv) is torch.nn.Linear
    torch.testing.assert_close(_logits(merged), adapted, rtol=0, atol=1e-5)


# ---- a LoRA run and its adapter --------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(base, tmp_path_factory):
    """8 LoRA steps on the shipped instruct data (its training file; the eval file stays held out)."""
    out = tmp_path_factory.mktemp("lora-run")
    overrides = lora_overrides(out, base, steps=8, **{"data.train": f"[{INSTRUCT_TRAIN}]", "checkpoint.interval": 4})
    return out, train(load_run(INSTRUCT_YAML, overrides))


def test_a_lora_run_lowers_the_loss_on_the_instruct_data(run):
    out, result = run
    losses = list(result.losses.values())  # each step's batch differs: compare the first and last three
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2  # held out: the eval test
    assert result.adapter == out / "adapter"
    config = json.loads((result.adapter / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["task_type"] == "CAUSAL_LM"
    keys = load_file(result.adapter / ADAPTER_WEIGHTS)
    assert len(keys) == 16 and all(k.startswith("base_model.model.transformer.blocks.") for k in keys)


def test_lora_checkpoints_hold_only_the_adapters_and_their_base(run, base):
    out, _ = run
    import torch.distributed.checkpoint as dcp

    checkpoint = latest_checkpoint(out / "checkpoints")
    keys = dcp.FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    model_keys = [k for k in keys if k.startswith("model.")]
    assert len(model_keys) == 16 and all("lora_" in k for k in model_keys)
    assert any(k.startswith("optimizer.state.") for k in keys) and "data" in keys and "rng_rank0.torch" in keys
    size = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    base_size = (base / "model.safetensors").stat().st_size
    assert size < base_size / 10  # 16 small adapter matrices + their Adam moments; the base is 13 MB
    identity = json.loads((checkpoint / "base_identity.json").read_text())
    assert identity["path"] == str(base) and len(identity["sha256"]) == 64
    assert (checkpoint / "adapter" / ADAPTER_WEIGHTS).is_file()


ROUND_TRIP = """
import sys
import torch
try:
    import mptkit
except ImportError:
    pass
else:
    sys.exit("mptkit is importable here")
from peft import PeftModel
from transformers import AutoModelForCausalLM

base, adapter, merged, out = sys.argv[1:]
tokens = torch.load(out + ".in")
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, trust_remote_code=True), adapter).eval()
plain = AutoModelForCausalLM.from_pretrained(merged, trust_remote_code=True).eval()
with torch.no_grad():
    torch.save({"peft": model(input_ids=tokens).logits, "merged": plain(input_ids=tokens).logits}, out)
"""


def test_peft_reads_the_adapter_without_mptkit_and_merged_exports_match(run, base, tmp_path):
    _, result = run
    merged = tmp_path / "merged"
    assert mptkit_main(["export", str(base), str(merged), "--merge-lora", str(result.adapter)]) == 0
    assert not (merged / ADAPTER_CONFIG).exists() and (merged / "modeling_mpt.py").is_file()
    torch.save(TOKENS, tmp_path / "logits.pt.in")
    # -I -S: no PYTHONPATH, cwd or .pth files (the editable install of mptkit) on the path; only the
    # environment's site-packages, where transformers, peft and torch live.
    site = sysconfig.get_paths()["purelib"]
    code = f"import sys; sys.path.append({site!r}); exec(compile({ROUND_TRIP!r}, 'round_trip', 'exec'))"
    done = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(base), str(result.adapter), str(merged),
                           str(tmp_path / "logits.pt")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"HF_HOME": str(tmp_path / "hf-home"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout + done.stderr
    outside = torch.load(tmp_path / "logits.pt")
    ours = _logits(load(base, dtype="float32", adapter=result.adapter).model)
    assert not torch.allclose(ours, _logits(load(base, dtype="float32").model), atol=1e-3)  # the adapter matters
    torch.testing.assert_close(outside["peft"], ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(outside["merged"], ours, rtol=0, atol=1e-5)


def test_eval_and_generate_take_an_adapter(run, base, tmp_path):
    """Held-out responses (the eval file) score better with the adapter; generate loads it too."""
    _, result = run
    scores = {}
    for name, extra in (("base", []), ("adapted", ["--adapter", str(result.adapter)])):
        argv = ["eval", "perplexity", str(base), str(INSTRUCT_EVAL), "--text-field", "response", "--seq-len", "64",
                "--quiet", "--json", str(tmp_path / f"{name}.json"), *extra]
        assert mptkit_main(argv) == 0
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())["perplexity"]
    assert scores["adapted"] < scores["base"]  # tuned on these responses' distribution
    argv = ["generate", str(base), "--adapter", str(result.adapter), "--prompt", "Hello", "--max-new-tokens", "4",
            "--temperature", "0"]
    assert mptkit_main(argv) == 0


def test_a_lora_run_directory_reads_as_its_base_with_its_adapter(run, base, tmp_path):
    """`mptkit export`/`generate`/`eval` given the LoRA run itself: the base its checkpoint records, with
    the checkpoint's adapter; the reference is peft's own PeftModel on the base."""
    from peft import PeftModel

    out, result = run
    loaded = load(out / "checkpoints", dtype="float32")
    assert loaded.source.path == latest_checkpoint(out / "checkpoints")
    with torch.no_grad():
        reference = PeftModel.from_pretrained(MPTForCausalLM.from_pretrained(base).eval(), str(result.adapter))(TOKENS).logits
    torch.testing.assert_close(_logits(loaded.model), reference, rtol=0, atol=1e-5)
    assert mptkit_main(["export", str(out / "checkpoints"), str(tmp_path / "merged")]) == 0
    torch.testing.assert_close(_logits(load(tmp_path / "merged", dtype="float32").model), reference, rtol=0, atol=1e-5)


def test_an_adapter_is_refused_on_another_base(run, tmp_path, capsys):
    _, result = run
    other = _save_base(tmp_path / "other", seed=1)  # same architecture, other weights
    with pytest.raises(ValueError, match="was trained on the base .* not on .*other"):
        load(other, adapter=result.adapter)
    assert mptkit_main(["generate", str(other), "--adapter", str(result.adapter), "--prompt", "Hi"]) == 2
    assert "was trained on the base" in capsys.readouterr().err


# ---- exact resume, refusal of another base -----------------------------------------------------------

STEPS = 6


def _resume_argv(output_dir, base) -> list[str]:
    overrides = lora_overrides(output_dir, base, steps=STEPS, **{
        "lora.dropout": 0.1, "checkpoint.interval": 2, "checkpoint.keep_last_n": 2})  # dropout: RNG matters
    return ["train", str(INSTRUCT_YAML), *overrides]


def test_sigkill_mid_run_then_resume_gives_bitwise_identical_losses(base, tmp_path):
    reference = start_mptkit(_resume_argv(tmp_path / "reference", base), tmp_path / "reference.log")
    out = tmp_path / "run"
    victim = start_mptkit(_resume_argv(out, base), tmp_path / "victim.log")

    def past_the_first_checkpoint() -> bool:  # step 3 logged: killed between the checkpoints of steps 2 and 4
        return (out / "metrics.jsonl").exists() and 3 in logged_losses(out)

    deadline = time.monotonic() + 240
    while victim.is_alive() and time.monotonic() < deadline and not past_the_first_checkpoint():
        time.sleep(0.01)
    assert victim.is_alive() and past_the_first_checkpoint(), (tmp_path / "victim.log").read_text()
    victim.kill()  # SIGKILL
    victim.join()
    assert victim.exitcode == -signal.SIGKILL
    saved = latest_checkpoint(out / "checkpoints")
    assert saved is not None and saved.name != f"step_{STEPS:08d}"

    resumed = start_mptkit(_resume_argv(out, base), tmp_path / "resumed.log")
    for process in (resumed, reference):
        process.join(timeout=240)
    assert (resumed.exitcode, reference.exitcode) == (0, 0), (tmp_path / "resumed.log").read_text()
    assert f"resuming from {saved}" in (tmp_path / "resumed.log").read_text()
    expected, after = logged_losses(tmp_path / "reference"), logged_losses(out)
    assert sorted(after) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert after[step] == expected[step], f"step {step}"  # bitwise: no tolerance

    # The same run pointed at another base (same shapes, other weights) is refused before it starts.
    other = _save_base(tmp_path / "other-base", seed=1)
    with pytest.raises(ConfigError, match="trained on the base .* but this run's base is .*other-base"):
        build_training_state(load_run(INSTRUCT_YAML, _resume_argv(out, base)[2:] + [f"model.init_from={other}"]))
    # ... and so is the checkpoint of a LoRA run as the starting weights of another run.
    with pytest.raises(ConfigError, match="is a LoRA run's checkpoint: it holds adapter weights only"):
        build_training_state(load_run(INSTRUCT_YAML, lora_overrides(tmp_path / "x", latest_checkpoint(
            out / "checkpoints"), steps=1)))


# ---- FSDP2 -------------------------------------------------------------------------------------------


def record_reduced_parameters():
    """In a rank: log the names of the parameters whose gradients FSDP2 reduce-scatters."""
    import os

    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    reduce = _fsdp_param_group.foreach_reduce
    log = open(os.path.join(os.environ["LORA_REDUCED_LOG"], f"rank{os.environ['RANK']}.reduced"), "a")

    def logging_reduce(fsdp_params, *args, **kwargs):
        log.write("".join(f"{p._param_fqn}\n" for p in fsdp_params))
        log.flush()
        return reduce(fsdp_params, *args, **kwargs)

    _fsdp_param_group.foreach_reduce = logging_reduce


def test_two_fsdp2_ranks_match_one_process_and_reduce_only_adapter_gradients(base, tmp_path):
    # Global batch 4: one process takes 2 micro-batches of 2; each of 2 ranks takes 2 micro-batches of 1.
    argv = ["train", str(INSTRUCT_YAML), *lora_overrides(tmp_path / "single", base, steps=3)]
    one = start_mptkit(argv, tmp_path / "single.log")
    argv = ["train", str(INSTRUCT_YAML), *lora_overrides(tmp_path / "sharded", base, steps=3, **{
        "train.micro_batch_size": 1})]
    port = free_port()
    ranks = [
        start_mptkit(argv, tmp_path / f"rank{rank}.log", patch=record_reduced_parameters, env={
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "LORA_REDUCED_LOG": str(tmp_path)})
        for rank in (0, 1)]
    for process in [one, *ranks]:
        process.join(timeout=300)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.log")))
    assert [p.exitcode for p in [one, *ranks]] == [0, 0, 0], logs
    expected, got = logged_losses(tmp_path / "single"), logged_losses(tmp_path / "sharded")
    assert sorted(got) == [1, 2, 3]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-5), f"step {step}"
    for rank in (0, 1):
        reduced = (tmp_path / f"rank{rank}.reduced").read_text().split()
        # once per step (on the last micro-batch), the 16 adapter matrices only
        assert len(reduced) == 3 * 16 and all("lora_" in name for name in reduced), reduced[:5]
    # the sharded run's adapter is the whole adapter, as the 1-process run writes it
    single = load_file(tmp_path / "single" / "adapter" / ADAPTER_WEIGHTS)
    sharded = load_file(tmp_path / "sharded" / "adapter" / ADAPTER_WEIGHTS)
    assert single.keys() == sharded.keys()
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], rtol=0, atol=1e-5)


# ---- the int8 base -----------------------------------------------------------------------------------


def test_frozen_int8_linear_is_the_dequantized_linear_with_its_input_gradient():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, bias=False)
    quantized = FrozenLinear(linear, torch.int8, torch.float32)
    assert quantized.weight.dtype == torch.int8 and not quantized.weight.requires_grad
    dequantized = torch.nn.Linear(64, 96, bias=False)
    dequantized.weight.data = quantized.weight.float() * quantized.scales[:, None]
    x = torch.randn(3, 5, 64, requires_grad=True)
    quantized(x).pow(2).sum().backward()
    grad, x.grad = x.grad, None
    torch.testing.assert_close(quantized(x), dequantized(x), rtol=1e-5, atol=1e-5)
    dequantized(x).pow(2).sum().backward()
    torch.testing.assert_close(grad, x.grad, rtol=1e-5, atol=1e-5)
    assert (quantized.weight.float() * quantized.scales[:, None] - linear.weight).abs().max() <= (
        linear.weight.abs().amax() / 254 + 1e-7)  # half a quantization step
    halved = FrozenLinear(linear, torch.bfloat16, torch.float32)  # bf16 storage, fp32 compute
    assert halved.weight.dtype == torch.bfloat16 and halved.scales is None
    torch.testing.assert_close(halved(x), F.linear(x, linear.weight.bfloat16().float()), rtol=0, atol=1e-6)


def test_lora_on_an_int8_base_trains_on_cpu(base, tmp_path):
    state = build_training_state(load_run(INSTRUCT_YAML, lora_overrides(tmp_path, base, steps=4,
                                                                       **{"lora.base_quantization": "int8"})))
    wqkv = state.model.transformer.blocks[0].attn.Wqkv
    assert isinstance(wqkv.base_layer, FrozenLinear) and wqkv.base_layer.weight.dtype == torch.int8
    losses = [train_step(state).loss for _ in range(4)]
    assert losses[-1] < losses[0] - 0.5


# ---- configuration errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("lora.target_modules=[Wqkv,q_proj]", "lora.target_modules: no module of this model is called 'q_proj'; "
                                          "its Linear modules are Wqkv, down_proj, out_proj, up_proj"),
    ("lora.target_modules=[wte]", "lora.target_modules: wte is tied to the output projection"),
    ("lora.target_modules=[norm_1]", "lora.target_modules: norm_1 is not a Linear layer (MPTNorm)"),
    ("lora.modules_to_save=[nrom_f]", "lora.modules_to_save: no module of this model is called 'nrom_f' "
                                      "(did you mean 'norm_f'?)"),
    ("lora.rnak=4", "lora.rnak: unknown key (did you mean 'rank'?)"),
    ("lora.dropout=1", "lora.dropout: expected a value in [0, 1), got 1.0"),
])
def test_lora_config_errors_name_the_key(base, override, message):
    overrides = ["model.init_from=null", "model.preset=tiny", override]  # a preset: checked when the file is read
    with pytest.raises(ConfigError) as info:
        load_run(INSTRUCT_YAML, overrides)
    assert message in str(info.value) and f"override {override!r}" in str(info.value)
    with pytest.raises(ConfigError) as info:  # an init_from model: checked when the file is read too
        load_run(INSTRUCT_YAML, lora_overrides("unused", base, steps=1) + [override])
    assert message in str(info.value) and f"override {override!r}" in str(info.value)


def test_quantized_bases_say_where_they_run(base):
    # train.device=cpu: refused when read on any machine, a CUDA one too.
    with pytest.raises(ConfigError, match="override 'lora.base_quantization=nf4': lora.base_quantization: nf4 needs CUDA"):
        load_run(INSTRUCT_YAML, lora_overrides("unused", base, steps=1, **{"lora.base_quantization": "nf4",
                                                                           "train.device": "cpu"}))
    from mptkit.train import lora

    run = load_run(INSTRUCT_YAML, lora_overrides("unused", base, steps=1, **{"lora.base_quantization": "int8"}))
    two_ranks = DistributedEnv(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"lora.base_quantization: int8 \(a compact frozen base\) trains in one process"):
        lora.check_launch(run, two_ranks)


@pytest.mark.slow
def test_lora_with_compile_and_activation_checkpointing_matches_eager(base, tmp_path):
    """train.compile (per-block torch.compile over peft's layers) and recompute: the same fp32 losses."""
    losses = {}
    for name, extra in (("eager", {}), ("compiled", {"train.compile": "true", "train.activation_checkpointing": "true"})):
        result = train(load_run(INSTRUCT_YAML, lora_overrides(tmp_path / name, base, steps=3, **extra)))
        losses[name] = list(result.losses.values())
    assert losses["compiled"] == pytest.approx(losses["eager"], abs=1e-4)
