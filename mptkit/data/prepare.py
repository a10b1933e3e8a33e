"""`mptkit data prepare`: tokenize corpora into fixed-length pretraining samples in shards.

Documents are tokenized in large batches by the Rust tokenizer on all cores (the GIL is released,
so the next batch is read while the current one is encoded), concatenated as
doc_1 EOS doc_2 EOS ..., cut into samples of `seq_len` tokens and written as raw token arrays (see
`mptkit.data.shards`). The incomplete last sample is dropped and counted.

Restartable: after each shard, progress.json records the shards written and the position in the
inputs (last fully written record, and how many tokens of the next record are already in shards).
Re-running the same command continues from there and produces the same bytes as an uninterrupted
run. Changed settings or inputs (size, mtime) refuse to resume unless `overwrite`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from mptkit.data.errors import DataError, ErrorPolicy
from mptkit.data.shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE,
    PROGRESS_FILE,
    shard_file_name,
    token_dtype,
)
from mptkit.data.sources import Segment, can_cut_documents, iter_segments, resolve_inputs
from mptkit.data.tokenizer import backend_fingerprint, load_tokenizer, plain_backend, tokenizer_size

logger = logging.getLogger("mptkit.data")

DEFAULT_SHARD_BYTES = 1 << 26  # 64 MiB: few files, cheap to fetch one at a time
DEFAULT_PIECE_CHARS = 1 << 15  # long documents are tokenized in pieces of ~32K characters
DEFAULT_BATCH_CHARS = 1 << 22  # ~1M tokens per encode call keeps every core busy


Position = tuple[int, int]


@dataclass
class _Pending:
    """A segment whose tokens are not all in shards yet. `start` is the absolute stream position of
    its first token (for a resumed partial segment, of the first token before the resume point)."""

    position: Position
    source: int
    start: int
    tokens: int
    ends_document: bool
    chars: int


class _ResumePolicy(ErrorPolicy):
    """Drops problems at or before the resume point: the interrupted run already recorded them."""

    def __init__(self, on_error: str, skipped: list[DataError], resume_after: Position | None):
        super().__init__(on_error, list(skipped))
        self.resume_after = resume_after

    def handle(self, error: DataError) -> None:
        if self.resume_after is not None and error.position is not None and error.position <= self.resume_after:
            return
        super().handle(error)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def _batches(segments: Iterator[Segment], batch_chars: int) -> Iterator[list[Segment]]:
    batch, chars = [], 0
    for segment in segments:
        batch.append(segment)
        chars += len(segment.text)
        if chars >= batch_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _remove_outputs(out: Path) -> None:
    for path in out.iterdir():
        if path.name in (INDEX_FILE, PROGRESS_FILE) or (path.name.startswith("shard-") and
                                                        path.suffix in (".bin", ".tmp")):
            path.unlink()


def prepare_pretraining(
    inputs: Sequence[Any] | str,
    out_dir: str | os.PathLike,
    *,
    tokenizer: PreTrainedTokenizerBase | str | None = None,
    seq_len: int = 2048,
    text_field: str = "text",
    samples_per_shard: int | None = None,
    on_error: str = "skip",
    overwrite: bool = False,
    progress: bool = True,
    batch_chars: int = DEFAULT_BATCH_CHARS,
    piece_chars: int = DEFAULT_PIECE_CHARS,
) -> dict:
    """Tokenize `inputs` into shards in `out_dir`; return the index (also written as index.json).

    inputs: paths or fsspec URLs of text files (one document each), JSONL files (`text_field` of each
    line), parquet files (column `text_field`), directories or globs of those (.gz etc. read
    transparently), or in-memory iterables of strings/mappings such as a `datasets.Dataset`.
    on_error: "skip" records bad records (see index["skipped"]) and goes on; "fail" raises the
    first `DataError`. An input with no complete sample is always an error.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    tok = tokenizer if isinstance(tokenizer, PreTrainedTokenizerBase) else load_tokenizer(tokenizer)
    tokenizer_name = tokenizer if isinstance(tokenizer, str) else (
        "EleutherAI/gpt-neox-20b" if tokenizer is None else getattr(tok, "name_or_path", "") or "custom")
    eos_id = tok.eos_token_id
    dtype = token_dtype(tokenizer_size(tok))
    if samples_per_shard is None:
        samples_per_shard = max(1, DEFAULT_SHARD_BYTES // (seq_len * dtype.itemsize))
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    backend = plain_backend(tok)
    spec = json.loads(backend.to_str())
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    cut_chars = piece_chars if can_cut_documents(spec) else None

    sources = resolve_inputs([inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs))
    settings = json.loads(json.dumps({
        "inputs": [s.describe() | ({"rows": len(s.rows)} if hasattr(s.rows, "__len__") else {}) for s in sources],
        "text_field": text_field, "seq_len": seq_len, "samples_per_shard": samples_per_shard,
        "dtype": dtype.str, "eos_id": eos_id, "tokenizer_fingerprint": backend_fingerprint(backend),
        "piece_chars": cut_chars,
    }))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index_path, progress_path = out / INDEX_FILE, out / PROGRESS_FILE
    if overwrite:
        _remove_outputs(out)
    elif index_path.exists():
        existing = json.loads(index_path.read_text(encoding="utf-8"))
        if existing.get("settings") == settings:
            logger.info("%s: already prepared with these settings", out)
            return existing
        raise FileExistsError(f"{out}: holds shards prepared from other inputs or settings; "
                              "pass overwrite=True (--overwrite) to replace them")
    saved = json.loads(progress_path.read_text(encoding="utf-8")) if progress_path.exists() else None
    if saved is not None and saved["settings"] != settings:
        raise FileExistsError(f"{out}: holds an interrupted run with other inputs or settings; "
                              "pass overwrite=True (--overwrite) to start over")

    shards: list[dict] = saved["shards"] if saved else []
    written = saved["written_tokens"] if saved else 0
    skip_through: Position | None = tuple(saved["skip_through"]) if saved and saved["skip_through"] else None
    partial = (tuple(saved["partial"][0]), saved["partial"][1]) if saved and saved["partial"] else None
    stats = saved["stats"] if saved else [[0, 0, 0] for _ in sources]  # documents, tokens, chars
    policy = _ResumePolicy(on_error, [DataError.from_dict(d) for d in saved["skipped"]] if saved else [],
                           skip_through)
    if saved:
        logger.info("%s: resuming after %d shard(s)", out, len(shards))

    shard_tokens = samples_per_shard * seq_len
    pending: deque[_Pending] = deque()
    buffer: list[np.ndarray] = []
    buffered = 0
    stream_end = written  # absolute position after the last token tokenized

    def retire(upto: int) -> None:
        """Move segments entirely before stream position `upto` out of `pending` into `stats`."""
        nonlocal skip_through
        while pending and pending[0].start + pending[0].tokens <= upto:
            seg = pending.popleft()
            row = stats[seg.source]
            row[0] += seg.ends_document
            row[1] += seg.tokens
            row[2] += seg.chars
            skip_through = seg.position

    def write_shard(tokens: np.ndarray) -> None:
        nonlocal written, partial
        name = shard_file_name(len(shards))
        tmp = out / (name + ".tmp")
        tokens.astype(dtype, copy=False).tofile(tmp)
        os.replace(tmp, out / name)
        shards.append({"file": name, "num_samples": len(tokens) // seq_len,
                       "sha256": hashlib.sha256(tokens.astype(dtype, copy=False).tobytes()).hexdigest()})
        written += len(tokens)
        retire(written)
        partial = (pending[0].position, written - pending[0].start) if pending else None
        _write_json(progress_path, {
            "settings": settings, "shards": shards, "written_tokens": written,
            "skip_through": skip_through, "partial": partial, "stats": stats,
            "skipped": [e.to_dict() for e in policy.skipped
                        if e.position is None or (skip_through is not None and e.position <= skip_through)],
        })

    def flush(final: bool) -> None:
        nonlocal buffer, buffered
        if buffered < (seq_len if final else shard_tokens):
            return
        data = np.concatenate(buffer)
        pos = 0
        while len(data) - pos >= shard_tokens or (final and len(data) - pos >= seq_len):
            n = min(shard_tokens, (len(data) - pos) // seq_len * seq_len)
            write_shard(data[pos : pos + n])
            pos += n
        buffer, buffered = [data[pos:]], len(data) - pos

    def consume(batch: list[Segment], encodings: list) -> int:
        nonlocal partial_todo, buffered, stream_end
        parts, count = [], 0
        for segment, encoding in zip(batch, encodings):
            ids = encoding.ids
            full = len(ids) + segment.ends_document
            drop = 0
            if partial_todo is not None and segment.position == partial_todo[0]:
                drop, partial_todo = partial_todo[1], None
            pending.append(_Pending(segment.position, segment.position[0], stream_end - drop, full,
                                    segment.ends_document, len(segment.text)))
            stream_end += full - drop
            count += full - drop
            tail = (eos_id,) if segment.ends_document else ()
            parts.append(chain(ids, tail) if not drop else (list(ids) + list(tail))[drop:])
        buffer.append(np.fromiter(chain.from_iterable(parts), dtype=dtype, count=count))
        buffered += count
        flush(final=False)
        return count

    partial_todo = partial
    resume_from = skip_through
    started = time.perf_counter()
    segments = iter_segments(sources, text_field, policy, cut_chars)
    if resume_from is not None:
        segments = (s for s in segments if s.position > resume_from)
    bar = tqdm(desc=f"tokenizing -> {out.name}", unit="tok", unit_scale=True, disable=not progress)
    with ThreadPoolExecutor(max_workers=1) as pool:
        previous = None
        for batch in _batches(segments, batch_chars):
            future = pool.submit(encode, [s.text for s in batch], add_special_tokens=False)
            if previous is not None:
                bar.update(consume(previous[0], previous[1].result()))
                bar.set_postfix(shards=len(shards))
            previous = (batch, future)
        if previous is not None:
            bar.update(consume(previous[0], previous[1].result()))
    flush(final=True)
    tail_tokens = buffered
    retire(stream_end)
    bar.close()
    elapsed = time.perf_counter() - started
    tokens_this_run = stream_end - (saved["written_tokens"] if saved else 0)

    num_samples = sum(s["num_samples"] for s in shards)
    total_tokens = sum(row[1] for row in stats)
    if num_samples == 0:
        progress_path.unlink(missing_ok=True)
        raise DataError("empty_dataset", ", ".join(s.name for s in sources[:5]) + (" ..." if len(sources) > 5 else ""),
                        f"at least seq_len={seq_len} tokens for one sample",
                        got=f"{total_tokens} tokens from {sum(r[0] for r in stats)} documents; {policy.summary()}")
    index = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "seq_len": seq_len, "dtype": dtype.str, "eos_id": eos_id,
        "num_samples": num_samples, "num_tokens": num_samples * seq_len,
        "tokens_tokenized": total_tokens, "dropped_tail_tokens": tail_tokens,
        "documents": sum(r[0] for r in stats),
        "tokenizer": {"name": tokenizer_name, "fingerprint": settings["tokenizer_fingerprint"],
                      "vocab_size": tokenizer_size(tok)},
        "shards": shards,
        "sources": [s.describe() | {"documents": r[0], "tokens": r[1], "chars": r[2]} for s, r in zip(sources, stats)],
        "skipped": policy.to_json(),
        "settings": settings,
        "last_run": {"seconds": round(elapsed, 3), "tokens": tokens_this_run,
                     "tokens_per_second": round(tokens_this_run / max(elapsed, 1e-9))},
    }
    _write_json(index_path, index)
    progress_path.unlink(missing_ok=True)
    policy.log_summary(f"prepare {out}")
    return index
