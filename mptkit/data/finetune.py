"""Fine-tuning data: prompt/response and chat JSONL, rendered with MPT's templates, with the loss
restricted to responses.

Rows (one JSON object per line; `format="auto"` picks per row):
  chat             {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  prompt_response  {"prompt": str, "response": str}, or dolly's {"instruction", "context"?, "response"}
                   (rendered with the MPT instruct template)

Labels follow the HF convention (unshifted, -100 = no loss). A response's tokens are trained, and
so is what ends it: EOS after a prompt/response pair, `<|im_end|>` after an assistant turn. Token
labels are decided on the tokenization of the whole rendered text (token offsets against response
character spans), so input_ids are exactly what `tokenizer(text)` gives at inference.

Too long: a prompt/response pair longer than `max_seq_len` is dropped; a chat is cut after the last
assistant turn that fits (later turns dropped). Both are counted in `dataset.report`, and with
`on_error="fail"` both raise instead. A response is never cut in the middle.
"""

from __future__ import annotations

import bisect
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from mptkit.data.defaults import FORMATS, TRAIN_ON
from mptkit.data.errors import DEFAULT_ON_ERROR, DataError, ErrorPolicy, describe
from mptkit.data.sources import Source, iter_jsonl_rows, resolve_inputs
from mptkit.data.templates import (  # re-exported: the templates' public home is here too
    CHATML_GENERATION_PROMPT,
    CHATML_ROLES,
    DEFAULT_SYSTEM_PROMPT,
    IM_END,
    IM_START,
    INSTRUCT_TEMPLATE,
    format_chatml,
    format_chatml_turn,
    format_instruct,
)
from mptkit.data.tokenizer import load_tokenizer, plain_backend

__all__ = [
    "CHATML_GENERATION_PROMPT", "DEFAULT_SYSTEM_PROMPT", "IM_END", "IM_START", "INSTRUCT_TEMPLATE",
    "FinetuneDataset", "FinetuneReport", "collate_finetune", "dolly_to_prompt_response",
    "format_chatml", "format_instruct", "hh_to_messages",
]

logger = logging.getLogger("mptkit.data")

IGNORE_INDEX = -100
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass(frozen=True)
class _Where:
    file: str | None = None
    line: int | None = None
    unit: str = "line"

    def error(self, kind: str, expected: str, field: str | None = None, got: str | None = None) -> DataError:
        return DataError(kind, self.file, expected, line=self.line, field=field, got=got, unit=self.unit)


@dataclass(frozen=True)
class _Rendered:
    """Rendered example text; `responses` are the character spans of trained responses (content plus
    the end marker) and `turn_ends` where each of them ends incl. the turn's trailing newline."""

    text: str
    responses: tuple[tuple[int, int], ...]
    turn_ends: tuple[int, ...]
    append_eos: bool


# ---- converters ------------------------------------------------------------------------------
def _string_field(row: Mapping, name: str, where: _Where, *, required: bool = True, allow_empty: bool = False,
                  label: str | None = None) -> str:
    """row[name] as a string; `label` is the field's name in messages (default `name`)."""
    value, label = row.get(name), label or name
    if value is None:
        if required:
            raise where.error("missing_field", "a string", field=label)
        return ""
    if not isinstance(value, str):
        raise where.error("wrong_type", "a string", field=label, got=describe(value))
    if not allow_empty and not value.strip():
        raise where.error("empty_text", "non-empty text", field=label)
    return value


def _dolly(row: Mapping, where: _Where) -> dict[str, str]:
    instruction = _string_field(row, "instruction", where)
    context = _string_field(row, "context", where, required=False, allow_empty=True)
    return {"prompt": format_instruct(instruction, context), "response": _string_field(row, "response", where)}


def dolly_to_prompt_response(row: Mapping[str, Any]) -> dict[str, str]:
    """A databricks-dolly-15k row (instruction, context, response, ...) as {"prompt", "response"},
    the prompt rendered with the MPT instruct template."""
    return _dolly(row, _Where())


def hh_to_messages(text: str, system: str | None = None) -> list[dict[str, str]]:
    """An Anthropic HH-RLHF dialog ("\\n\\nHuman: ...\\n\\nAssistant: ...") as chat messages, optionally
    after a system message. Turns must alternate from Human to a final, non-empty Assistant turn."""
    expected = "alternating non-empty '\\n\\nHuman:' / '\\n\\nAssistant:' turns, from Human to Assistant"
    if not isinstance(text, str):
        raise DataError("wrong_type", None, "a dialog string", got=describe(text))
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise DataError("bad_dialog", None, expected, got=f"text before the first turn: {parts[0][:40]!r}")
    messages = [{"role": "system", "content": system}] if system else []
    for i, (speaker, content) in enumerate(zip(parts[1::2], parts[2::2])):
        role = _HH_ROLES[speaker]
        if role != ("user" if i % 2 == 0 else "assistant") or not content.strip():
            raise DataError("bad_dialog", None, expected, got=f"turn {i + 1} ({speaker}) {content[:40]!r}")
        messages.append({"role": role, "content": content.strip()})
    if len(parts) < 3 or messages[-1]["role"] != "assistant":
        raise DataError("bad_dialog", None, expected, got="no final Assistant turn")
    return messages


# ---- rendering -------------------------------------------------------------------------------
def _render_prompt_response(prompt: str, response: str) -> _Rendered:
    text = prompt + response
    return _Rendered(text, ((len(prompt), len(text)),), (len(text),), append_eos=True)


def _render_chat(messages: Any, where: _Where) -> _Rendered:
    if not isinstance(messages, list) or not messages:
        raise where.error("wrong_type", "a non-empty list of messages", field="messages", got=describe(messages))
    text, responses, turn_ends = "", [], []
    for i, message in enumerate(messages):
        name = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise where.error("wrong_type", "an object with 'role' and 'content'", field=name, got=describe(message))
        role = message.get("role")
        if role not in CHATML_ROLES or (role == "system" and i > 0):
            expected = f"one of {CHATML_ROLES} (system only first)"
            raise where.error("bad_role" if role is not None else "missing_field", expected, field=f"{name}.role",
                              got=None if role is None else describe(role))
        content = _string_field(message, "content", where, allow_empty=role != "assistant", label=f"{name}.content")
        turn = format_chatml_turn(role, content)
        if role == "assistant":
            start = len(text) + len(IM_START) + len("assistant\n")
            responses.append((start, start + len(content) + len(IM_END)))
            turn_ends.append(len(text) + len(turn))
        text += turn
    if messages[-1].get("role") != "assistant":
        raise where.error("bad_role", "a conversation that ends with an assistant message",
                          field=f"messages[{len(messages) - 1}].role", got=describe(messages[-1].get("role")))
    return _Rendered(text, tuple(responses), tuple(turn_ends), append_eos=False)


def _render(row: Mapping, fmt: str, where: _Where) -> _Rendered:
    if fmt == "chat" or (fmt == "auto" and "messages" in row):
        if "messages" not in row:
            raise where.error("missing_field", "a list of messages", field="messages")
        return _render_chat(row["messages"], where)
    if "prompt" in row:
        return _render_prompt_response(_string_field(row, "prompt", where), _string_field(row, "response", where))
    if "instruction" in row:
        pair = _dolly(row, where)
        return _render_prompt_response(pair["prompt"], pair["response"])
    if fmt == "auto":
        raise where.error("missing_field", "'messages', or 'prompt' and 'response', or 'instruction' and 'response'",
                          field="messages", got=f"keys {sorted(row)[:8]}")
    raise where.error("missing_field", "'prompt' and 'response' (or dolly's 'instruction' and 'response')",
                      field="prompt", got=f"keys {sorted(row)[:8]}")


# ---- dataset ---------------------------------------------------------------------------------
@dataclass
class FinetuneReport:
    """What happened to the input rows."""

    rows: int = 0  # JSON objects read
    examples: int = 0  # kept (possibly truncated)
    truncated: list[str] = field(default_factory=list)  # places of chats cut at a turn boundary
    turns_dropped: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # kind -> count
    sequences: int = 0
    tokens: int = 0
    label_tokens: int = 0

    def summary(self) -> str:
        text = (f"{self.examples} examples from {self.rows} rows in {self.sequences} sequences, "
                f"{self.tokens} tokens ({self.label_tokens} trained)")
        if self.truncated:
            text += (f"; {len(self.truncated)} chats cut after their last assistant turn that fits "
                     f"({self.turns_dropped} assistant turns dropped, first at {self.truncated[0]})")
        if self.skipped:
            text += "; skipped " + ", ".join(f"{n} {kind}" for kind, n in self.skipped.items())
        return text


class FinetuneDataset(Dataset):
    """Map-style dataset of {"input_ids", "labels", "sequence_id"} LongTensors (see module doc).

    train_on: "last" trains only the final response of each example, "all" every assistant response.
    train_on_prompt: also train on prompt tokens (then every token is trained).
    packing: put several examples into each sequence of up to max_seq_len tokens (best-fit
      decreasing); sequence_id numbers them 0, 1, ... and no label crosses from one to the next.
    """

    def __init__(
        self,
        files: str | Sequence[Any],
        tokenizer: PreTrainedTokenizerBase | str | None,
        max_seq_len: int,
        *,
        format: str = FORMATS[0],
        train_on: str = TRAIN_ON[0],
        train_on_prompt: bool = False,
        packing: bool = False,
        on_error: str = DEFAULT_ON_ERROR,
    ) -> None:
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
        self.tokenizer = tokenizer if isinstance(tokenizer, PreTrainedTokenizerBase) else load_tokenizer(tokenizer)
        self.max_seq_len, self.format, self.train_on = max_seq_len, format, train_on
        self.train_on_prompt, self.packing = train_on_prompt, packing
        self.pad_id, self.eos_id = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        self.policy = ErrorPolicy(on_error)
        self.report = FinetuneReport()
        sources = resolve_inputs([files] if isinstance(files, str) else list(files))

        rendered: list[tuple[_Where, _Rendered]] = []
        for index, source in enumerate(sources):
            for where, row in self._rows(index, source):
                self.report.rows += 1
                try:
                    rendered.append((where, _render(row, format, where)))
                except DataError as error:
                    self.policy.handle(error)
        self._examples = self._tokenize(rendered)
        self.report.examples = len(self._examples)
        if not self._examples:
            raise DataError("empty_dataset", ", ".join(s.name for s in sources[:5]),
                            "at least one usable example", got=self.policy.summary())
        lengths = [len(ids) for ids, _ in self._examples]
        self._sequences = _pack(lengths, max_seq_len) if packing else [[i] for i in range(len(lengths))]
        self.report.sequences = len(self._sequences)
        self.report.tokens = sum(lengths)
        self.report.label_tokens = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in self._examples)
        self.report.skipped = self.policy.counts()
        if self.policy.skipped or self.report.truncated:
            logger.warning("fine-tuning data: %s\n%s", self.report.summary(), self.policy.summary())

    def _rows(self, index: int, source: Source):
        if source.kind == "jsonl":
            for line, row in iter_jsonl_rows(source, self.policy, index):
                yield _Where(source.name, line), row
        elif source.kind == "rows":
            for row_no, row in enumerate(source.rows, 1):
                where = _Where(source.name, row_no, "row")
                if isinstance(row, Mapping):
                    yield where, row
                else:
                    self.policy.handle(where.error("wrong_type", "a mapping", got=describe(row)))
        else:
            self.policy.handle(DataError("unsupported_file", source.name, "a JSONL file (.jsonl, .jsonl.gz)",
                                         got=f"a {source.kind} file"))

    def _tokenize(self, rendered: list[tuple[_Where, _Rendered]]) -> list[tuple[np.ndarray, np.ndarray]]:
        backend = plain_backend(self.tokenizer)
        examples = []
        for lo in range(0, len(rendered), 4096):
            chunk = rendered[lo : lo + 4096]
            encodings = backend.encode_batch([r.text for _, r in chunk], add_special_tokens=False)
            for (where, example), encoding in zip(chunk, encodings):
                try:
                    examples.append(self._labelled(where, example, encoding))
                except DataError as error:
                    self.policy.handle(error)
        return examples

    def _labelled(self, where: _Where, example: _Rendered, encoding) -> tuple[np.ndarray, np.ndarray]:
        ids = np.array(encoding.ids, dtype=np.int64)
        offsets = np.array(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        spans = list(example.responses)
        if example.append_eos:
            ids = np.append(ids, self.eos_id)
            offsets = np.vstack([offsets, [len(example.text), len(example.text)]])
        if len(ids) > self.max_seq_len:
            fits = [k for k, end in enumerate(example.turn_ends)
                    if np.searchsorted(offsets[:, 1], end, side="right") <= self.max_seq_len]
            too_long = where.error("too_long", f"at most max_seq_len={self.max_seq_len} tokens",
                                   field="messages" if not example.append_eos else "response",
                                   got=f"{len(ids)} tokens")
            if example.append_eos or not fits or self.policy.on_error == "fail":
                raise too_long
            keep = fits[-1]
            n = int(np.searchsorted(offsets[:, 1], example.turn_ends[keep], side="right"))
            ids, offsets, spans = ids[:n], offsets[:n], spans[: keep + 1]
            self.report.truncated.append(where.file + (f", {where.unit} {where.line}" if where.line else ""))
            self.report.turns_dropped += len(example.responses) - len(spans)
        if self.train_on_prompt:
            trained = np.ones(len(ids), dtype=bool)
        else:
            trained = np.zeros(len(ids), dtype=bool)
            if example.append_eos:
                trained[-1] = True  # the EOS ending the response
            for start, end in spans if self.train_on == "all" else spans[-1:]:
                trained |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
        return ids, np.where(trained, ids, IGNORE_INDEX)

    def __len__(self) -> int:
        return len(self._sequences)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        parts = [self._examples[j] for j in self._sequences[i]]
        ids = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        sequence_id = np.concatenate([np.full(len(p[0]), k, dtype=np.int64) for k, p in enumerate(parts)])
        starts = np.cumsum([len(p[0]) for p in parts])[:-1]
        labels[starts] = IGNORE_INDEX  # never predict an example's first token from the previous one
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                "sequence_id": torch.from_numpy(sequence_id)}


def _pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing of example indices (deterministic)."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        j = bisect.bisect_left(free, (lengths[i], -1))
        if j == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - lengths[i], len(bins) - 1))
        else:
            remaining, b = free.pop(j)
            bins[b].append(i)
            bisect.insort(free, (remaining - lengths[i], b))
    return bins


def collate_finetune(batch: Sequence[Mapping[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of dataset items to the longest: input_ids with pad_id, labels with -100,
    sequence_id with -1, plus attention_mask (1 = real token)."""
    length = max(len(item["input_ids"]) for item in batch)
    out = {
        "input_ids": torch.full((len(batch), length), pad_id, dtype=torch.long),
        "labels": torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros((len(batch), length), dtype=torch.long),
        "sequence_id": torch.full((len(batch), length), -1, dtype=torch.long),
    }
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        out["input_ids"][row, :n] = item["input_ids"]
        out["labels"][row, :n] = item["labels"]
        out["attention_mask"][row, :n] = 1
        out["sequence_id"][row, :n] = item["sequence_id"]
    return out
