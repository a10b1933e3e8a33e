"""Perplexity of a causal LM over token documents: nonoverlapping and sliding-window evaluation.

Both evaluations feed the model windows of at most `seq_len` input tokens; each window predicts
the token after each of its inputs. Every token of a document except the first (which has no
context) is scored exactly once, so totals are comparable across window lengths:

- nonoverlapping (stride == seq_len): the document is cut into independent chunks of `seq_len`
  inputs; a shorter chunk takes the tail. A token's context is what precedes it in its chunk.
- sliding (stride < seq_len): windows of `seq_len` inputs advance by `stride` and score only the
  `stride` newest predictions, so every token after the first window sees at least
  `seq_len - stride` tokens of context. The last window ends at the document's end and scores
  what is left.

Windows never cross documents. Log-probabilities are taken in fp32 and summed in fp64.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mptkit.eval.defaults import DEFAULT_BATCH_TOKENS, PRECISIONS


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of an evaluation precision (None: plain fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return None if precision == "fp32" else torch.bfloat16


@dataclass(frozen=True)
class Window:
    """Inputs `tokens[start : start + length]`; their predictions target `tokens[start + 1 :
    start + length + 1]`, of which the last `num_scored` count."""

    start: int
    length: int
    num_scored: int

    @property
    def first_target(self) -> int:
        return self.start + self.length - self.num_scored + 1


def plan_windows(num_tokens: int, seq_len: int, stride: int | None = None) -> list[Window]:
    """The windows that score tokens 1 .. num_tokens - 1 of one document, each exactly once."""
    stride = seq_len if stride is None else stride
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    num_targets = num_tokens - 1  # targets are token positions 1 .. num_tokens - 1
    if num_targets < 1:
        return []
    if num_targets <= seq_len:
        return [Window(0, num_targets, num_targets)]
    windows = [Window(0, seq_len, seq_len)]
    scored = seq_len  # targets 1 .. scored are done
    if stride == seq_len:
        while scored < num_targets:
            length = min(seq_len, num_targets - scored)
            windows.append(Window(scored, length, length))
            scored += length
        return windows
    while scored < num_targets:
        new = min(stride, num_targets - scored)
        last_target = scored + new
        windows.append(Window(last_target - seq_len, seq_len, new))
        scored = last_target
    return windows


@dataclass(frozen=True)
class PerplexityResult:
    seq_len: int
    stride: int
    nll_sum: float  # natural-log negative log-likelihood, summed over scored tokens
    num_tokens: int  # tokens scored
    num_windows: int

    @property
    def mode(self) -> str:
        return "nonoverlapping" if self.stride == self.seq_len else "sliding"

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.num_tokens if self.num_tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll) if self.num_tokens else math.nan

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "seq_len": self.seq_len,
            "stride": self.stride,
            "tokens_scored": self.num_tokens,
            "windows": self.num_windows,
            "nll_sum": self.nll_sum,
            "mean_nll": self.mean_nll,
            "perplexity": self.perplexity,
        }


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def window_nll(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    *,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Per-token negative log-likelihood (fp32) of `targets` (B, T) given `input_ids` (B, S), where
    the targets are the next tokens of the last T inputs."""
    device = model_device(model)
    input_ids, targets = input_ids.to(device), targets.to(device)
    num_scored = targets.shape[1]
    kwargs = {"logits_to_keep": num_scored} if _accepts_logits_to_keep(model) else {}
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        logits = model(input_ids=input_ids, **kwargs).logits
    logits = logits[:, -num_scored:].float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)


def evaluate_perplexity(
    model: torch.nn.Module,
    documents: Sequence[Sequence[int]],
    seq_len: int,
    stride: int | None = None,
    *,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    description: str | None = None,
) -> PerplexityResult:
    """Perplexity of `model` over token `documents` (see the module doc for the two modes).

    Windows of the same shape are batched, up to `batch_tokens` input tokens per forward pass.
    """
    stride = seq_len if stride is None else stride
    work: dict[tuple[int, int], list[tuple[int, Window]]] = {}
    for doc_index, tokens in enumerate(documents):
        for window in plan_windows(len(tokens), seq_len, stride):
            work.setdefault((window.length, window.num_scored), []).append((doc_index, window))
    num_windows = sum(len(group) for group in work.values())
    total_targets = sum(max(len(tokens) - 1, 0) for tokens in documents)
    tensors = [torch.as_tensor(tokens, dtype=torch.long) for tokens in documents]

    was_training = model.training
    model.eval()
    nll_sum, num_scored = 0.0, 0
    label = description or f"perplexity @{seq_len}" + ("" if stride == seq_len else f"/{stride}")
    with tqdm(total=total_targets, desc=label, unit="tok", disable=not progress, leave=False) as bar:
        for (length, scored), group in work.items():
            batch_size = max(1, batch_tokens // length)
            for i in range(0, len(group), batch_size):
                chunk = group[i : i + batch_size]
                inputs = torch.stack([tensors[d][w.start : w.start + length] for d, w in chunk])
                targets = torch.stack([tensors[d][w.first_target : w.start + length + 1] for d, w in chunk])
                nll = window_nll(model, inputs, targets, autocast_dtype=autocast_dtype)
                nll_sum += nll.double().sum().item()
                num_scored += targets.numel()
                bar.update(targets.numel())
    model.train(was_training)
    if num_scored != total_targets:  # the window plan's invariant; cheap to keep checking
        raise AssertionError(f"scored {num_scored} tokens, expected {total_targets}")
    return PerplexityResult(seq_len, stride, nll_sum, num_scored, num_windows)


def tokenize_documents(tokenizer, texts: Iterable[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (a document is scored from its own start)."""
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
