"""Choosing the next token: greedy, temperature, top-k, top-p and repetition penalty.

Every row of a batch carries its own settings as tensors, so requests with different settings
share one decode step and the choice never leaves the device (no `.item()` per token). Random
draws use the exponential race: argmax(p / E) with E ~ Exp(1) picks index i with probability p_i,
from a per-row `torch.Generator` (a request's seed then fixes its text whatever else is batched).
"""

from __future__ import annotations

import torch

from .options import SamplingParams


class BatchSampler:
    """The per-row settings of a batch as tensors, plus which tokens each row has seen."""

    def __init__(self, params: list[SamplingParams], vocab_size: int, device: torch.device):
        self.params = params
        self.all_greedy = all(p.greedy for p in params)
        self.temperature = torch.tensor([p.temperature for p in params], device=device)
        self.top_k = torch.tensor([p.top_k for p in params], device=device)
        self.top_p = torch.tensor([p.top_p for p in params], device=device)
        self.penalty = torch.tensor([p.repetition_penalty for p in params], device=device)
        self.any_penalty = any(p.repetition_penalty != 1.0 for p in params)
        self.seen = torch.zeros(len(params), vocab_size, dtype=torch.bool, device=device)
        self.generators = [_generator(p.seed, device) for p in params]

    def observe(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Mark `tokens` (B, S) as present (for the repetition penalty); `valid` masks padding."""
        if not self.any_penalty:
            return
        hits = torch.ones_like(tokens, dtype=torch.int32) if valid is None else valid.to(torch.int32)
        # counted, not scattered as bools: a padding slot must not overwrite a real hit on its id
        counts = torch.zeros(self.seen.shape, dtype=torch.int32, device=tokens.device).scatter_add_(1, tokens, hits)
        self.seen |= counts > 0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of every row, (B,), from fp32 logits (B, V)."""
        logits = logits.float()
        if self.any_penalty:
            logits = apply_repetition_penalty(logits, self.seen, self.penalty)
        if self.all_greedy:
            return logits.argmax(dim=-1)
        filtered = filter_logits(logits, self.temperature, self.top_k, self.top_p)
        noise = torch.stack([_exponential(logits.shape[-1], g, logits.device) for g in self.generators])
        drawn = (filtered.softmax(dim=-1) / noise).argmax(dim=-1)
        return torch.where(self.temperature == 0, logits.argmax(dim=-1), drawn)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL (Keskar et al. 2019): a seen token's logit is divided by the penalty if positive,
    multiplied if negative, so >1 always makes it less likely."""
    penalty = penalty[:, None]
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_logits(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Temperature-scaled logits with everything outside top-k and the top-p nucleus at -inf.

    Rows with temperature 0 are scaled by 1 (the caller takes their argmax). top_k 0 and top_p 1
    keep every token. The nucleus is the smallest set of most likely tokens whose probability
    reaches top_p (the most likely token is always kept).
    """
    scale = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    logits = logits / scale[:, None]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = mass_before >= top_p[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _exponential(size: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.empty(size, device=device).exponential_(generator=generator)
