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
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from mptkit.data.defaults import DEFAULT_SEQ_LEN, DEFAULT_SHARD_BYTES
from mptkit.data.errors import DEFAULT_ON_ERROR, DataError, ErrorPolicy
from mptkit.data.shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE,
    PROGRESS_FILE,
    shard_file_name,
    token_dtype,
)
from mptkit.data.sources import DEFAULT_TEXT_FIELD, Segment, Source, can_cut_documents, iter_segments, resolve_inputs
from mptkit.data.tokenizer import (
    BUNDLED_TOKENIZER_NAMES,
    backend_fingerprint,
    load_tokenizer,
    plain_backend,
    tokenizer_size,
)
from mptkit.files import staged

logger = logging.getLogger("mptkit.data")

DEFAULT_PIECE_CHARS = 1 << 15  # long documents are tokenized in pieces of ~32K characters
DEFAULT_BATCH_CHARS = 1 << 22  # ~1M tokens per encode call keeps every core busy


Position = tuple[int, int]


@dataclass
class SourceStats:
    """What one input put into the stream: whole documents, tokens (EOS included) and characters."""

    documents: int = 0
    tokens: int = 0
    chars: int = 0

    def __add__(self, other: SourceStats) -> SourceStats:
        return SourceStats(self.documents + other.documents, self.tokens + other.tokens, self.chars + other.chars)


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
    text = json.dumps(data, indent=1, ensure_ascii=False).encode()
    with staged(path, len(text)) as temp:
        temp.write_bytes(text)


class ShardWriter:
    """Cuts the token stream into samples of `seq_len` and shards of `samples_per_shard` samples in
    `out`; after each shard, progress.json records how far the inputs are written (module doc).
    Constructed on a directory holding an interrupted run with the same settings, it continues it.

    Stream positions count tokens from the start of the first shard; `pending` holds the segments,
    in order, whose tokens are not all in shards yet. `policy` records bad input; progress.json
    keeps what it recorded up to the last record written."""

    def __init__(self, out: Path, settings: dict, on_error: str) -> None:
        self.out, self.settings = out, settings
        self.seq_len, self.dtype, self.eos_id = settings["seq_len"], np.dtype(settings["dtype"]), settings["eos_id"]
        self.shard_tokens = settings["samples_per_shard"] * self.seq_len
        saved = self._read_progress()
        self.shards: list[dict] = saved["shards"]
        self.written: int = saved["written_tokens"]
        self.skip_through: Position | None = tuple(saved["skip_through"]) if saved["skip_through"] else None
        # The interrupted run's first record not all in shards, and how many of its tokens are:
        # those are dropped when it is tokenized again.
        self._partial: tuple[Position, int] | None = (
            (tuple(saved["partial"][0]), saved["partial"][1]) if saved["partial"] else None)
        self.stats = [SourceStats(**s) for s in saved["stats"]]
        self.policy = _ResumePolicy(on_error, [DataError.from_dict(d) for d in saved["skipped"]], self.skip_through)
        self.pending: deque[_Pending] = deque()
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.stream_end = self.written  # absolute position after the last token tokenized

    def _read_progress(self) -> dict:
        """progress.json of an interrupted run with these settings, else the state of a fresh start."""
        path = self.out / PROGRESS_FILE
        if not path.exists():
            return {"shards": [], "written_tokens": 0, "skip_through": None, "partial": None,
                    "stats": [asdict(SourceStats()) for _ in self.settings["inputs"]], "skipped": []}
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved["settings"] != self.settings:
            raise FileExistsError(f"{self.out}: holds an interrupted run with other inputs or settings; "
                                  "pass overwrite=True (--overwrite) to start over")
        logger.info("%s: resuming after %d shard(s)", self.out, len(saved["shards"]))
        return saved

    def consume(self, batch: list[Segment], encodings: list) -> int:
        """Append the tokens of `batch` (EOS after each document) and write the shards that are full;
        return how many tokens were appended."""
        parts, count = [], 0
        for segment, encoding in zip(batch, encodings):
            ids = encoding.ids
            full = len(ids) + segment.ends_document
            drop = 0
            if self._partial is not None and segment.position == self._partial[0]:
                drop, self._partial = self._partial[1], None
            self.pending.append(_Pending(segment.position, segment.position[0], self.stream_end - drop, full,
                                         segment.ends_document, len(segment.text)))
            self.stream_end += full - drop
            count += full - drop
            tail = (self.eos_id,) if segment.ends_document else ()
            parts.append(chain(ids, tail) if not drop else (list(ids) + list(tail))[drop:])
        self.buffer.append(np.fromiter(chain.from_iterable(parts), dtype=self.dtype, count=count))
        self.buffered += count
        self._flush(final=False)
        return count

    def _flush(self, final: bool) -> None:
        """Write the buffered tokens as full shards; `final`: also the rest of the complete samples."""
        if self.buffered < (self.seq_len if final else self.shard_tokens):
            return
        data = np.concatenate(self.buffer)
        pos = 0
        while len(data) - pos >= self.shard_tokens or (final and len(data) - pos >= self.seq_len):
            n = min(self.shard_tokens, (len(data) - pos) // self.seq_len * self.seq_len)
            self._write_shard(data[pos : pos + n])
            pos += n
        self.buffer, self.buffered = [data[pos:]], len(data) - pos

    def finish(self) -> int:
        """Write the last complete samples and count every segment in `stats`; return the number of
        tokens dropped as the incomplete last sample."""
        self._flush(final=True)
        self._retire(self.stream_end)
        return self.buffered

    def _retire(self, upto: int) -> None:
        """Move segments entirely before stream position `upto` out of `pending` into `stats`."""
        while self.pending and self.pending[0].start + self.pending[0].tokens <= upto:
            seg = self.pending.popleft()
            self.stats[seg.source] += SourceStats(int(seg.ends_document), seg.tokens, seg.chars)
            self.skip_through = seg.position

    def _write_shard(self, tokens: np.ndarray) -> None:
        name = shard_file_name(len(self.shards))
        with staged(self.out / name, tokens.nbytes) as temp:
            tokens.tofile(temp)  # already of `dtype`: the buffer is built in it
        self.shards.append({"file": name, "num_samples": len(tokens) // self.seq_len,
                            "sha256": hashlib.sha256(tokens.tobytes()).hexdigest()})
        self.written += len(tokens)
        self._retire(self.written)
        head = self.pending[0] if self.pending else None
        _write_json(self.out / PROGRESS_FILE, {
            "settings": self.settings, "shards": self.shards, "written_tokens": self.written,
            "skip_through": self.skip_through,
            "partial": (head.position, self.written - head.start) if head else None,
            "stats": [asdict(s) for s in self.stats],
            # Problems after skip_through are met again by a resumed run, which records them then.
            "skipped": [e.to_dict() for e in self.policy.skipped if e.position is None
                        or (self.skip_through is not None and e.position <= self.skip_through)],
        })


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


def _tokenize(writer: ShardWriter, segments: Iterator[Segment], encode, batch_chars: int,
              progress: bool) -> tuple[int, dict]:
    """Encode `segments` into `writer`'s shards; return (dropped tail tokens, index["last_run"])."""
    started, first = time.perf_counter(), writer.stream_end
    bar = tqdm(desc=f"tokenizing -> {writer.out.name}", unit="tok", unit_scale=True, disable=not progress)
    with ThreadPoolExecutor(max_workers=1) as pool:  # the next batch is encoded while this one is written
        previous = None
        for batch in _batches(segments, batch_chars):
            future = pool.submit(encode, [s.text for s in batch], add_special_tokens=False)
            if previous is not None:
                bar.update(writer.consume(previous[0], previous[1].result()))
                bar.set_postfix(shards=len(writer.shards))
            previous = (batch, future)
        if previous is not None:
            bar.update(writer.consume(previous[0], previous[1].result()))
    tail_tokens = writer.finish()
    bar.close()
    elapsed = time.perf_counter() - started
    tokens = writer.stream_end - first
    return tail_tokens, {"seconds": round(elapsed, 3), "tokens": tokens,
                         "tokens_per_second": round(tokens / max(elapsed, 1e-9))}


def _remove_outputs(out: Path) -> None:
    for path in out.iterdir():
        if path.name in (INDEX_FILE, PROGRESS_FILE) or path.name.startswith(("shard-", ".tmp-shard-")):
            path.unlink()


def _finished_index(out: Path, settings: dict, overwrite: bool) -> dict | None:
    """The index of a finished run in `out` with these settings; `overwrite` first removes outputs."""
    index_path = out / INDEX_FILE
    if overwrite:
        _remove_outputs(out)
    elif index_path.exists():
        existing = json.loads(index_path.read_text(encoding="utf-8"))
        if existing.get("settings") == settings:
            logger.info("%s: already prepared with these settings", out)
            return existing
        raise FileExistsError(f"{out}: holds shards prepared from other inputs or settings; "
                              "pass overwrite=True (--overwrite) to replace them")
    return None


def _index(writer: ShardWriter, sources: list[Source], tokenizer: dict, tail_tokens: int, last_run: dict) -> dict:
    """index.json for the shards `writer` wrote; an error if they hold no sample."""
    num_samples = sum(s["num_samples"] for s in writer.shards)
    total = sum(writer.stats, SourceStats())
    if num_samples == 0:
        raise DataError("empty_dataset", ", ".join(s.name for s in sources[:5]) + (" ..." if len(sources) > 5 else ""),
                        f"at least seq_len={writer.seq_len} tokens for one sample",
                        got=f"{total.tokens} tokens from {total.documents} documents; {writer.policy.summary()}")
    return {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "seq_len": writer.seq_len, "dtype": writer.dtype.str, "eos_id": writer.eos_id,
        "num_samples": num_samples, "num_tokens": num_samples * writer.seq_len,
        "tokens_tokenized": total.tokens, "dropped_tail_tokens": tail_tokens,
        "documents": total.documents,
        "tokenizer": tokenizer,
        "shards": writer.shards,
        "sources": [s.describe() | asdict(stats) for s, stats in zip(sources, writer.stats)],
        "skipped": writer.policy.to_json(),
        "settings": writer.settings,
        "last_run": last_run,
    }


def prepare_pretraining(
    inputs: Sequence[Any] | str,
    out_dir: str | os.PathLike,
    *,
    tokenizer: PreTrainedTokenizerBase | str | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    text_field: str = DEFAULT_TEXT_FIELD,
    samples_per_shard: int | None = None,
    on_error: str = DEFAULT_ON_ERROR,
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
        BUNDLED_TOKENIZER_NAMES[0] if tokenizer is None else getattr(tok, "name_or_path", "") or "custom")
    dtype = token_dtype(tokenizer_size(tok))
    if samples_per_shard is None:
        samples_per_shard = max(1, DEFAULT_SHARD_BYTES // (seq_len * dtype.itemsize))
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    backend = plain_backend(tok)
    cut_chars = piece_chars if can_cut_documents(json.loads(backend.to_str())) else None
    sources = resolve_inputs([inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs))
    settings = json.loads(json.dumps({
        "inputs": [s.describe() | ({"rows": len(s.rows)} if hasattr(s.rows, "__len__") else {}) for s in sources],
        "text_field": text_field, "seq_len": seq_len, "samples_per_shard": samples_per_shard,
        "dtype": dtype.str, "eos_id": tok.eos_token_id, "tokenizer_fingerprint": backend_fingerprint(backend),
        "piece_chars": cut_chars,
    }))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    finished = _finished_index(out, settings, overwrite)
    if finished is not None:
        return finished
    writer = ShardWriter(out, settings, on_error)
    segments = iter_segments(sources, text_field, writer.policy, cut_chars)
    resume_after = writer.policy.resume_after
    if resume_after is not None:  # those records are in shards already
        segments = (s for s in segments if s.position > resume_after)
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    tail_tokens, last_run = _tokenize(writer, segments, encode, batch_chars, progress)
    index = _index(writer, sources, {"name": tokenizer_name, "fingerprint": settings["tokenizer_fingerprint"],
                                     "vocab_size": tokenizer_size(tok)}, tail_tokens, last_run)
    _write_json(out / INDEX_FILE, index)
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    writer.policy.log_summary(f"prepare {out}")
    return index
