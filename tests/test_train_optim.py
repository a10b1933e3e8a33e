"""Optimizers and schedules against float64 re-derivations and closed forms."""

import math

import pytest
import torch
from torch import nn

from mptkit.model import MPTConfig, MPTForCausalLM
from mptkit.train.config import OptimizerConfig, ScheduleConfig
from mptkit.train.optim import build_optimizer, build_scheduler, lr_factor, parameter_groups


def _toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(11, 6), nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 11))


def _run(optimizer_config: OptimizerConfig, schedule: ScheduleConfig, steps: int):
    """Train the toy model a few steps; return the fp32 parameters and the gradients/lrs used."""
    model = _toy_model()
    initial = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, optimizer_config)
    scheduler = build_scheduler(optimizer, schedule, steps)
    tokens = torch.randint(0, 11, (4, 7), generator=torch.Generator().manual_seed(1))
    history = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        loss.backward()
        history.append(({n: p.grad.double().clone() for n, p in model.named_parameters()}, scheduler.get_last_lr()[0]))
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return model, initial, history


def _decayed(name: str) -> bool:
    # Linear weights only: "0." is the embedding, "2." the LayerNorm, biases are 1-D.
    return name in ("1.weight", "3.weight")


SCHEDULE = ScheduleConfig(name="cosine", warmup_steps=2, final_lr_ratio=0.1)


def test_adamw_matches_a_float64_decoupled_adamw():
    config = OptimizerConfig(name="adamw", lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    model, params, history = _run(config, SCHEDULE, steps=5)
    beta1, beta2 = config.betas
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    for t, (grads, lr) in enumerate(history, start=1):
        for n in params:
            g = grads[n]
            m[n] = beta1 * m[n] + (1 - beta1) * g
            v[n] = beta2 * v[n] + (1 - beta2) * g * g
            update = (m[n] / (1 - beta1**t)) / ((v[n] / (1 - beta2**t)).sqrt() + config.eps)
            decay = config.weight_decay * lr / config.lr if _decayed(n) else 0.0
            params[n] = params[n] * (1 - decay) - lr * update
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach().double(), params[n], rtol=1e-5, atol=1e-6, msg=n)


def test_lion_matches_a_float64_decoupled_lion():
    config = OptimizerConfig(name="lion", lr=1e-3, betas=(0.9, 0.99), weight_decay=0.5)
    model, params, history = _run(config, SCHEDULE, steps=5)
    beta1, beta2 = config.betas
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    for grads, lr in history:
        for n in params:
            g = grads[n]
            decay = config.weight_decay * lr / config.lr if _decayed(n) else 0.0
            params[n] = params[n] * (1 - decay) - lr * torch.sign(beta1 * m[n] + (1 - beta1) * g)
            m[n] = beta2 * m[n] + (1 - beta2) * g
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach().double(), params[n], rtol=1e-5, atol=1e-6, msg=n)


def test_weight_decay_skips_norms_and_embeddings_of_mpt_unless_asked():
    model = MPTForCausalLM(MPTConfig.from_preset("tiny", no_bias=False))
    names = {id(p): n for n, p in model.named_parameters()}

    def group_names(config):
        decayed, *rest = parameter_groups(model, config)
        return {names[id(p)] for p in decayed["params"]}, {names[id(p)] for g in rest for p in g["params"]}

    decayed, undecayed = group_names(OptimizerConfig(weight_decay=0.1))
    assert decayed and all(n.endswith(".weight") and ("Wqkv" in n or "proj" in n) for n in decayed)
    assert "transformer.wte.weight" in undecayed
    assert {n for n in undecayed if "norm" in n or n.endswith(".bias")} | {"transformer.wte.weight"} == undecayed
    decayed, undecayed = group_names(OptimizerConfig(weight_decay=0.1, decay_embeddings=True, decay_norms_and_biases=True))
    assert undecayed == set() and len(decayed) == len(names)


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_schedules_follow_their_closed_forms(name):
    schedule = ScheduleConfig(name=name, warmup_steps=4, final_lr_ratio=0.2)
    max_steps = 14  # decay over steps 4..13
    assert [lr_factor(s, schedule, max_steps) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    for step in range(4, max_steps):
        progress = (step - 4) / 9
        expected = {
            "cosine": 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * progress)),
            "linear": 1 - 0.8 * progress,
            "constant": 1.0,
        }[name]
        assert lr_factor(step, schedule, max_steps) == pytest.approx(expected, abs=1e-12)
    if name != "constant":
        assert lr_factor(max_steps - 1, schedule, max_steps) == pytest.approx(0.2)
