"""Multiple-choice evaluation (HellaSwag / PIQA / ARC style) from a local JSONL file.

Each line is `{"context": str, "choices": [str, ...], "label": int}`. A choice is scored by the
log-likelihood of its tokens after the context. Two accuracies are reported, as
lm-evaluation-harness does: `acc` picks the highest summed log-likelihood, `acc_norm` the highest
log-likelihood per UTF-8 byte of the choice, which removes the bias toward short endings.

Tokenization follows the harness: the context's trailing spaces move to the choice, the pair is
tokenized as one text, and the choice's tokens are those after the context's own tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mptkit.eval.defaults import DEFAULT_BATCH_SIZE
from mptkit.eval.perplexity import model_device


class MultipleChoiceError(ValueError):
    """A bad line in a multiple-choice file; the message names the file, line and field."""


@dataclass(frozen=True)
class Example:
    context: str
    choices: tuple[str, ...]
    label: int


def read_examples(path: str | Path) -> list[Example]:
    """Parse and validate a multiple-choice JSONL file."""
    path = Path(path)
    examples = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue

            def fail(field: str | None, expected: str, got: object) -> None:
                where = f"{path}, line {line_no}" + (f", field {field!r}" if field else "")
                raise MultipleChoiceError(f"{where}: expected {expected}, got {got!r}")

            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                fail(None, "one JSON object per line", f"{e.msg} at column {e.colno}")
            if not isinstance(row, dict):
                fail(None, "a JSON object", type(row).__name__)
            context, choices, label = row.get("context"), row.get("choices"), row.get("label")
            if not isinstance(context, str):
                fail("context", "a string (may be empty)", context)
            if not isinstance(choices, list) or len(choices) < 2:
                fail("choices", "a list of at least two strings", choices)
            for choice in choices:
                if not isinstance(choice, str) or not choice:
                    fail("choices", "non-empty strings", choice)
            if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
                fail("label", f"an integer index into choices (0..{len(choices) - 1})", label)
            examples.append(Example(context, tuple(choices), label))
    if not examples:
        raise MultipleChoiceError(f"{path}: no examples")
    return examples


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), split the way lm-evaluation-harness splits them."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped) :] + continuation
    whole = tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(stripped, add_special_tokens=False)["input_ids"] if stripped else []
    continuation_ids = whole[len(context_ids) :]
    if not context_ids:  # nothing to condition on: start from end-of-text, as the harness does
        context_ids = [tokenizer.eos_token_id]
    return context_ids, continuation_ids


@torch.no_grad()
def continuation_logprobs(
    model: torch.nn.Module,
    requests: Sequence[tuple[list[int], list[int]]],
    *,
    max_len: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> list[float]:
    """Summed log-probability of each continuation given its context.

    Sequences are right-padded in a batch (causal attention never looks right, so padding needs
    no mask) and cut from the left to `max_len` input tokens when given.
    """
    device = model_device(model)
    results: list[float] = [0.0] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
    for start in tqdm(range(0, len(order), batch_size), desc="multiple choice", disable=not progress, leave=False):
        indices = order[start : start + batch_size]
        inputs, targets = [], []
        for i in indices:
            context_ids, continuation_ids = requests[i]
            if not continuation_ids:
                raise ValueError(f"request {i}: the continuation has no tokens")
            sequence = (context_ids + continuation_ids)[:-1]
            if max_len is not None:
                sequence = sequence[-max_len:]
            inputs.append(sequence)
            targets.append(continuation_ids)
        width = max(len(s) for s in inputs)
        batch = torch.zeros(len(inputs), width, dtype=torch.long)
        for row, sequence in enumerate(inputs):
            batch[row, : len(sequence)] = torch.tensor(sequence)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits = model(input_ids=batch.to(device)).logits
        for row, i in enumerate(indices):
            end, count = len(inputs[row]), len(targets[row])
            row_logits = logits[row, end - count : end].float()
            target = torch.tensor(targets[row], device=device)
            results[i] = -F.cross_entropy(row_logits, target, reduction="sum").double().item()
    return results


@dataclass(frozen=True)
class MultipleChoiceResult:
    num_examples: int
    acc: float
    acc_norm: float
    predictions: list[dict]

    def to_dict(self) -> dict:
        return {"examples": self.num_examples, "acc": self.acc, "acc_norm": self.acc_norm}


def evaluate_multiple_choice(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    *,
    max_len: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> MultipleChoiceResult:
    requests, owners = [], []
    for example_index, example in enumerate(examples):
        for choice in example.choices:
            requests.append(encode_pair(tokenizer, example.context, choice))
            owners.append(example_index)
    was_training = model.training
    model.eval()
    logprobs = continuation_logprobs(
        model, requests, max_len=max_len, batch_size=batch_size, autocast_dtype=autocast_dtype, progress=progress
    )
    model.train(was_training)

    predictions, correct, correct_norm, cursor = [], 0, 0, 0
    for example in examples:
        scores = logprobs[cursor : cursor + len(example.choices)]
        cursor += len(example.choices)
        normalised = [s / len(c.encode("utf-8")) for s, c in zip(scores, example.choices)]
        pick = max(range(len(scores)), key=scores.__getitem__)
        pick_norm = max(range(len(normalised)), key=normalised.__getitem__)
        correct += pick == example.label
        correct_norm += pick_norm == example.label
        predictions.append(
            {"label": example.label, "pred": pick, "pred_norm": pick_norm, "loglik": scores, "loglik_per_byte": normalised}
        )
    n = len(examples)
    return MultipleChoiceResult(n, correct / n, correct_norm / n, predictions)


def harness_task_yaml(jsonl_path: str | Path, task_name: str) -> str:
    """An lm-evaluation-harness task definition for one of our multiple-choice files, read
    offline through the `json` dataset builder. The harness joins context and choice with no
    delimiter, as we do: put the separating space at the start of each choice."""
    if not task_name.replace("_", "").isalnum():
        raise ValueError(f"task name must be letters, digits and underscores, got {task_name!r}")
    data_file = json.dumps(str(Path(jsonl_path).resolve()))
    return (
        f"task: {task_name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {data_file}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        'target_delimiter: ""\n'
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "  - metric: acc_norm\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
    )
