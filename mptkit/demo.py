"""`mptkit demo`: the whole toolkit in one command, on a laptop's CPU, in about ten minutes.

1. pretrain a small ALiBi MPT on the bundled novels (GPT-NeoX tokenizer, 128-token samples),
2. instruction-tune it on the bundled instruct data (MPT's instruct template, response-only loss),
3. measure perplexity on two held-out novels at 1x, 2x and 4x the training length,
4. export HF-format checkpoints and check that transformers' model-card code loads them,
5. answer the MPT-7B-instruct model card's prompt with the instruct template,
6. write out/demo/summary.md with the loss curves, the extrapolation table and plot.

Every stage runs the package's own code (mptkit.train, mptkit.eval, mptkit.inference). Training
steps are sized from a measured step time so that the run fits its time budget on slow machines
and trains longer on fast ones. `--quick` (or MPTKIT_DEMO_QUICK=1) runs a toy budget for tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL_CARD_PROMPT = "Summarize the key differences between REST and GraphQL APIs."


@dataclass(frozen=True)
class StageBudget:
    """Training steps for one stage: seconds / measured step time, clamped to [min, max]."""

    seconds: float
    min_steps: int
    max_steps: int


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("out/demo")
    # model: an ALiBi MPT; the GPT-NeoX vocabulary (50432 rows) holds most of the parameters
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4
    context: int = 512  # max_seq_len written to the checkpoint: 4x the training length (ALiBi)
    precision: str = "fp32"  # bf16 is slower than fp32 on CPUs without AMX (docs/benchmarks.md, Training)
    # pretraining on the books
    books: tuple[str, ...] = ("data/books/train",)
    heldout: tuple[str, ...] = ("data/books/heldout",)
    train_len: int = 128
    pretrain_batch: int = 16
    pretrain_lr: float = 2e-3
    pretrain: StageBudget = StageBudget(seconds=330, min_steps=60, max_steps=1500)
    # instruction tuning
    instruct: tuple[str, ...] = ("data/instruct/hh-helpful-base-train.jsonl",)
    instruct_val: tuple[str, ...] = ("data/instruct/hh-helpful-base-eval.jsonl",)
    finetune_len: int = 256
    finetune_batch: int = 16
    finetune_lr: float = 1e-3
    finetune: StageBudget = StageBudget(seconds=120, min_steps=20, max_steps=600)
    # extrapolation: the first tokens of each held-out book, at these multiples of train_len
    eval_tokens_per_book: int = 8192
    multiples: tuple[int, ...] = (1, 2, 4)
    # the answer
    max_new_tokens: int = 160
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.2
    seed: int = 17


QUICK = dict(
    d_model=64,
    n_heads=4,
    n_layers=2,
    context=128,
    books=("data/books/train/pg5200.txt.gz",),
    train_len=32,
    pretrain_batch=4,
    pretrain=StageBudget(seconds=0, min_steps=3, max_steps=3),
    finetune_len=64,
    finetune_batch=4,
    finetune=StageBudget(seconds=0, min_steps=2, max_steps=2),
    eval_tokens_per_book=256,
    max_new_tokens=8,
)


class Stages:
    """Numbered stage banners with elapsed wall time, and a record of each stage's duration."""

    def __init__(self, total: int):
        self.total, self.index = total, 0
        self.started = time.perf_counter()
        self.durations: dict[str, float] = {}
        self._current: tuple[str, float] | None = None

    def begin(self, title: str) -> None:
        self.end()
        self.index += 1
        print(f"\n=== [{self.index}/{self.total}] {title}  (t = {self.elapsed():.0f} s) ===", flush=True)
        self._current = (title, time.perf_counter())

    def end(self) -> None:
        if self._current is not None:
            title, began = self._current
            self.durations[title] = time.perf_counter() - began
            self._current = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


# ---- stages ---------------------------------------------------------------------------------------


def _resolve(paths: tuple[str, ...]) -> list[str]:
    """Repo-relative data paths (the demo runs from a source checkout, where the data ships)."""
    resolved = []
    for path in paths:
        candidate = Path(path) if Path(path).exists() else REPO / path
        if not candidate.exists():
            raise FileNotFoundError(f"demo data {path} not found (looked in . and {REPO}); run from a clone of the repo")
        resolved.append(str(candidate))
    return resolved


def measure_step_seconds(run, repeats: int = 2) -> float:
    """Mean seconds per optimizer step of a resolved run, timed on the training step itself after one
    warm-up step (the mean, not the best: a busy machine should plan fewer steps, not more).

    The run's own data and model are set up as training sets them up; its checkpoints go to a
    throw-away directory, so the real run starts fresh.
    """
    from mptkit.train.loop import build_training_state, train_step

    config = run.config
    probe = Path(config.output_dir) / "step-timing"
    shutil.rmtree(probe, ignore_errors=True)
    # The checkpoint directory takes no part in resolving a run: the resolved run stays valid.
    state = build_training_state(replace(run, config=replace(config, checkpoint=replace(config.checkpoint, dir=str(probe)))))
    seconds = [train_step(state).elapsed for _ in range(repeats + 1)][1:]
    shutil.rmtree(probe, ignore_errors=True)
    return sum(seconds) / repeats


def plan_steps(run, budget: StageBudget, label: str) -> int:
    if budget.min_steps == budget.max_steps:
        return budget.min_steps
    seconds = measure_step_seconds(run)
    steps = int(min(max(budget.seconds / seconds, budget.min_steps), budget.max_steps))
    print(f"[demo] {label}: measured {seconds:.2f} s/step -> {steps} steps for a {budget.seconds / 60:.1f}-minute budget",
          flush=True)
    return steps


def _stage_config(base_yaml: str, cfg: DemoConfig, *, name: str, out: Path, model, data_train, data_val, lr: float,
                  batch: int, seq_len: int):
    """A shipped config, loaded once, with the demo's changes: CPU, no periodic checkpoints or evals
    (the demo evaluates afterwards), a fresh start."""
    from mptkit.train.config import read_config

    base = read_config(REPO / base_yaml)
    return replace(
        base, name=name, output_dir=str(out), seed=cfg.seed, model=model,
        data=replace(base.data, train=_resolve(data_train), val=_resolve(data_val)),
        optimizer=replace(base.optimizer, lr=lr),
        train=replace(base.train, device="cpu", global_batch_size=batch, micro_batch_size=batch, seq_len=seq_len,
                      precision=cfg.precision),
        checkpoint=replace(base.checkpoint, interval=0, keep_last_n=1, resume="never"),
        eval=replace(base.eval, interval=0, max_batches=4),
        logging=replace(base.logging, interval=1, tensorboard=False),
    )


def run_training(config, budget: StageBudget, label: str):
    """Size the stage's steps from a measured step time, then train."""
    from mptkit.train.config import resolve
    from mptkit.train.loop import train

    steps = plan_steps(resolve(config), budget, label)
    run = resolve(replace(config, train=replace(config.train, max_steps=steps),
                          schedule=replace(config.schedule, warmup_steps=max(1, steps // 20))))
    print(f"[demo] {label}: {steps} steps (the validated run config is saved beside each checkpoint as "
          "run_config.yaml)", flush=True)
    return run.config, train(run)


def pretrain(cfg: DemoConfig):
    from mptkit.train.config import ModelConfig

    model = ModelConfig(preset="tiny", overrides={"d_model": cfg.d_model, "n_heads": cfg.n_heads,
                                                  "n_layers": cfg.n_layers, "max_seq_len": cfg.context,
                                                  "attn_config": {"alibi": True}})
    config = _stage_config("configs/pretrain/tiny.yaml", cfg, name="demo-pretrain", out=cfg.out / "pretrain",
                           model=model, data_train=cfg.books, data_val=cfg.heldout, lr=cfg.pretrain_lr,
                           batch=cfg.pretrain_batch, seq_len=cfg.train_len)
    config = replace(config, schedule=replace(config.schedule, name="cosine"))
    return run_training(config, cfg.pretrain, "pretraining")


def finetune(cfg: DemoConfig, pretrained_checkpoint: Path):
    from mptkit.train.config import ModelConfig

    config = _stage_config("configs/finetune/instruct.yaml", cfg, name="demo-instruct", out=cfg.out / "finetune",
                           model=ModelConfig(preset=None, init_from=str(pretrained_checkpoint)),
                           data_train=cfg.instruct, data_val=cfg.instruct_val, lr=cfg.finetune_lr,
                           batch=cfg.finetune_batch, seq_len=cfg.finetune_len)
    return run_training(config, cfg.finetune, "instruction tuning")


def extrapolation(cfg: DemoConfig, model_dir: Path):
    """Held-out perplexity of the pretrained model at 1x, 2x, 4x its training length."""
    import torch

    from mptkit.data.sources import read_texts
    from mptkit.eval.extrapolation import markdown_table, plot_curves, sweep, sweep_columns
    from mptkit.eval.perplexity import tokenize_documents
    from mptkit.loading import load

    lengths = [cfg.train_len * m for m in cfg.multiples]
    loaded = load(model_dir, dtype="float32", max_seq_len=max(lengths))
    model = loaded.model
    documents = tokenize_documents(loaded.tokenizer, read_texts(_resolve(cfg.heldout)))
    documents = [d[: cfg.eval_tokens_per_book] for d in documents]
    points = sweep(model, documents, lengths, autocast_dtype=torch.bfloat16 if cfg.precision == "bf16" else None)
    columns = sweep_columns(points)
    plot_curves(lengths, columns, cfg.train_len, cfg.out / "extrapolation.png",
                f"held-out books: demo model trained at {cfg.train_len} tokens")
    table = markdown_table(lengths, columns)
    print(table, flush=True)
    return points, table


def check_model_card_loading(model_dir: Path, prompt: str) -> tuple[str, int, int]:
    """Load the export exactly as the MPT model cards do and compare its logits with mptkit's;
    returns the verdict and the parameter count."""
    import torch
    import transformers

    from mptkit.model import MPTForCausalLM

    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    ours = MPTForCausalLM.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        difference = (model.eval()(ids).logits - ours(ids).logits).abs().max().item()
    if difference > 1e-4:
        raise RuntimeError(f"the model-card load of {model_dir} differs from mptkit's by {difference:.2e}")
    verdict = f"{type(model).__module__}.{type(model).__name__}, logits equal to mptkit's (max |diff| {difference:.1e})"
    return verdict, sum(p.numel() for p in model.parameters()), model.get_input_embeddings().weight.numel()


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str  # "stop": the model ended it with end-of-text; "length": it hit the cap
    tokens: int


def answer(cfg: DemoConfig, model_dir: Path, prompt: str) -> Reply:
    """The instruct-template answer, streamed to the terminal as it is generated."""
    from mptkit.data.templates import format_instruct
    from mptkit.inference.decode import Decoder
    from mptkit.inference.prompts import stop_token_ids
    from mptkit.inference.sampling import SamplingParams
    from mptkit.inference.text import GenerationRequest, stream_batch
    from mptkit.loading import load

    loaded = load(model_dir, dtype="float32")
    tokenizer = loaded.tokenizer
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            repetition_penalty=cfg.repetition_penalty, seed=cfg.seed)
    request = GenerationRequest(tokenizer(format_instruct(prompt))["input_ids"], params,
                                stop_token_ids(tokenizer, "instruct"))
    print(f"### Instruction:\n{prompt}\n\n### Response:", flush=True)
    pieces, last = [], None
    for updates in stream_batch(Decoder(loaded.model), tokenizer, [request]):
        for update in updates:
            pieces.append(update.text)
            last = update
            sys.stdout.write(update.text)
            sys.stdout.flush()
    print(flush=True)
    return Reply("".join(pieces).strip(), last.finish_reason, last.generated)


# ---- the summary ----------------------------------------------------------------------------------

MPT_7B_COMPUTE = 6.65e9 * 1e12  # 6.65B parameters x 1T training tokens (the MPT-7B model card)


@dataclass(frozen=True)
class DemoFacts:
    """What the run measured: the summary, its honesty statement and summary.json are made from these."""

    load_start: float
    parameters: int
    embedding_parameters: int  # the token embedding (tied to the output): most of a small MPT
    pretrain_steps: int
    pretrain_tokens: int
    pretrain_loss: float
    pretrain_val_loss: float
    finetune_steps: int
    finetune_tokens: int
    finetune_loss: float
    finetune_val_loss: float
    eval_tokens: int
    extrapolation: tuple[dict, ...]  # {seq_len, nonoverlapping, sliding} per eval length
    answer: str
    answer_finish: str  # "stop": the model ended it with end-of-text; "length": it hit the cap
    answer_tokens: int

    @property
    def pretrain_val_ppl(self) -> float:
        return math.exp(self.pretrain_val_loss)

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "pretrain_val_ppl": self.pretrain_val_ppl}


def _template(name: str) -> str:
    return (Path(__file__).parent / "assets" / "demo" / name).read_text()


def _common_fields(cfg: DemoConfig, model_dir: Path) -> dict:
    return dict(model_dir=model_dir, base_dir=model_dir.parent / "base-model", prompt=MODEL_CARD_PROMPT,
                temperature=cfg.temperature, top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty,
                seed=cfg.seed, train_len=cfg.train_len)


def usage_text(cfg: DemoConfig, model_dir: Path) -> str:
    return _template("usage.md").format(**_common_fields(cfg, model_dir)).rstrip()


def honesty_text(cfg: DemoConfig, facts: DemoFacts) -> str:
    """What the run shows and what it cannot, stated from this run's own measurements."""
    seen = facts.pretrain_tokens + facts.finetune_tokens
    change = facts.extrapolation[-1]["nonoverlapping"] / facts.extrapolation[0]["nonoverlapping"] - 1
    if facts.answer_finish == "stop":
        ending = f"it ended its answer itself with end-of-text after {facts.answer_tokens} tokens"
    else:
        ending = f"it did not end its answer by itself within {facts.answer_tokens} tokens"
    return _template("honesty.md").format(
        parameters_m=facts.parameters / 1e6, embedding_m=facts.embedding_parameters / 1e6,
        pretrain_tokens_m=facts.pretrain_tokens / 1e6, finetune_tokens_m=facts.finetune_tokens / 1e6,
        compute_exponent=round(math.log10(MPT_7B_COMPUTE / (facts.parameters * seen))),
        pretrain_val_ppl=facts.pretrain_val_ppl, ending=ending, longest_multiple=cfg.multiples[-1],
        change_abs=abs(change), direction="lower" if change < 0 else "higher",
    ).rstrip()


def write_summary(cfg: DemoConfig, facts: DemoFacts, table: str, card_check: str, stages: Stages) -> Path:
    model_dir = cfg.out / "model"
    load_end = os.getloadavg()[0]
    busy = (" (other processes were competing for the cores: times here are slower than on an idle machine)"
            if max(facts.load_start, load_end) > (os.cpu_count() or 1) + 0.5 else "")
    text = _template("summary.md").format(
        **_common_fields(cfg, model_dir), **dataclasses.asdict(facts),
        n_layers=cfg.n_layers, d_model=cfg.d_model, parameters_m=facts.parameters / 1e6,
        minutes=stages.elapsed() / 60, cpu_count=os.cpu_count(), precision=cfg.precision, load_end=load_end,
        busy=busy, pretrain_batch=cfg.pretrain_batch, pretrain_tokens_m=facts.pretrain_tokens / 1e6,
        pretrain_val_ppl=facts.pretrain_val_ppl, finetune_batch=cfg.finetune_batch, finetune_len=cfg.finetune_len,
        longest_eval=cfg.train_len * max(cfg.multiples), eval_tokens_per_book=cfg.eval_tokens_per_book,
        table=table, honesty=honesty_text(cfg, facts), card_check=card_check, usage=usage_text(cfg, model_dir),
        timing="\n".join(f"| {title} | {seconds:.0f} s |" for title, seconds in stages.durations.items()),
    )
    path = cfg.out / "summary.md"
    path.write_text(text)
    return path


# ---- main -----------------------------------------------------------------------------------------


def _final(losses: dict[int, float], last: int = 10) -> float:
    steps = sorted(losses)[-last:]
    return sum(losses[s] for s in steps) / len(steps)


def _stage_tokens(result, config) -> int:
    return result.step * config.train.global_batch_size * config.train.seq_len


def run(cfg: DemoConfig) -> Path:
    from mptkit.export.hf import export_hf

    stages = Stages(total=6)
    load_start = os.getloadavg()[0]
    for owned in ("pretrain", "finetune", "model", "base-model"):
        shutil.rmtree(cfg.out / owned, ignore_errors=True)
    cfg.out.mkdir(parents=True, exist_ok=True)
    print(f"mptkit demo -> {cfg.out}/  (a small ALiBi MPT, end to end on {os.cpu_count()} CPU thread(s))", flush=True)

    stages.begin("Pretraining on the bundled books (data/books/train; Gatsby and Alice held out)")
    pre_config, pre = pretrain(cfg)
    shutil.copyfile(Path(pre_config.output_dir) / "loss_curve.png", cfg.out / "pretrain_loss.png")

    stages.begin("Instruction tuning with MPT's instruct template (data/instruct)")
    ft_config, ft = finetune(cfg, pre.checkpoint)
    shutil.copyfile(Path(ft_config.output_dir) / "loss_curve.png", cfg.out / "finetune_loss.png")

    stages.begin("Exporting HF-format checkpoints")
    export_hf(pre.checkpoint, cfg.out / "base-model")
    export_hf(ft.checkpoint, cfg.out / "model")
    card_check, parameters, embedding_parameters = check_model_card_loading(cfg.out / "model", MODEL_CARD_PROMPT)
    print(f"[demo] wrote {cfg.out / 'model'} and {cfg.out / 'base-model'}; model-card load: {card_check}", flush=True)

    stages.begin(f"Extrapolation: perplexity at {', '.join(f'{m}x' for m in cfg.multiples)} the training length")
    points, table = extrapolation(cfg, cfg.out / "base-model")

    stages.begin("Answering the model card's prompt with the instruct template")
    reply = answer(cfg, cfg.out / "model", MODEL_CARD_PROMPT)

    stages.begin("Writing the summary")
    facts = DemoFacts(
        load_start=load_start, parameters=parameters, embedding_parameters=embedding_parameters,
        pretrain_steps=pre.step, pretrain_tokens=_stage_tokens(pre, pre_config), pretrain_loss=_final(pre.losses),
        pretrain_val_loss=pre.val_loss,
        finetune_steps=ft.step, finetune_tokens=_stage_tokens(ft, ft_config), finetune_loss=_final(ft.losses),
        finetune_val_loss=ft.val_loss,
        eval_tokens=points[0].nonoverlapping.num_tokens,
        extrapolation=tuple(
            {"seq_len": p.seq_len, "nonoverlapping": p.nonoverlapping.perplexity, "sliding": p.sliding.perplexity}
            for p in points
        ),
        answer=reply.text, answer_finish=reply.finish_reason, answer_tokens=reply.tokens,
    )
    stages.end()
    summary = write_summary(cfg, facts, table, card_check, stages)
    (cfg.out / "summary.json").write_text(json.dumps({**facts.to_json(), "seconds": stages.elapsed()}, indent=2))
    print(f"\n{honesty_text(cfg, facts)}\n")
    print(usage_text(cfg, cfg.out / "model"))
    print(f"\nDone in {stages.elapsed() / 60:.1f} min (load average {load_start:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} now, on {os.cpu_count()} CPU threads). Summary: {summary} (loss curves and extrapolation plot beside it).")
    return summary


def main(command: str = "demo", argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mptkit demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DemoConfig.out, help="output folder (default: out/demo)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="training budget in minutes (default 7.5: pretraining 5.5, instruction tuning 2)")
    parser.add_argument("--quick", action="store_true", default=os.environ.get("MPTKIT_DEMO_QUICK") == "1",
                        help="a few steps of a toy model (for tests); also MPTKIT_DEMO_QUICK=1")
    args = parser.parse_args(argv or [])
    cfg = DemoConfig(out=args.out)
    if args.quick:
        cfg = dataclasses.replace(cfg, **QUICK)
    elif args.minutes is not None:
        total = cfg.pretrain.seconds + cfg.finetune.seconds
        scale = args.minutes * 60 / total
        cfg = dataclasses.replace(
            cfg,
            pretrain=dataclasses.replace(cfg.pretrain, seconds=cfg.pretrain.seconds * scale),
            finetune=dataclasses.replace(cfg.finetune, seconds=cfg.finetune.seconds * scale),
        )
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main("demo", sys.argv[1:]))
