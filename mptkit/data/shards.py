"""The on-disk format of pretraining shards, shared by `prepare` (writer) and the streaming loader.

A shard directory holds:
  index.json            format, seq_len, dtype, eos_id, tokenizer fingerprint, shard list,
                        token counts, sources, what was skipped
  shard-00000.bin ...   raw little-endian token ids (uint16 when the vocabulary fits, else uint32),
                        shape (num_samples, seq_len), C order: sample i is bytes
                        [i*seq_len*itemsize, (i+1)*seq_len*itemsize)

Samples are fixed windows of the token stream doc_1 EOS doc_2 EOS ...; nothing else is stored
(sequence ids are recomputed from EOS positions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import fsspec
import numpy as np

INDEX_FILE = "index.json"
PROGRESS_FILE = "progress.json"
FORMAT_NAME = "mptkit-token-shards"
FORMAT_VERSION = 1


def shard_file_name(i: int) -> str:
    return f"shard-{i:05d}.bin"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


@dataclass(frozen=True)
class ShardInfo:
    file: str
    num_samples: int
    sha256: str


@dataclass(frozen=True)
class ShardIndex:
    seq_len: int
    dtype: np.dtype
    eos_id: int
    shards: tuple[ShardInfo, ...]
    tokenizer: dict
    raw: dict  # the whole index.json

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @classmethod
    def from_json(cls, data: dict, where: str) -> ShardIndex:
        if data.get("format") != FORMAT_NAME or data.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{where}: expected an index.json of format {FORMAT_NAME!r} version {FORMAT_VERSION}, "
                f"got format {data.get('format')!r} version {data.get('version')!r}"
            )
        shards = tuple(ShardInfo(s["file"], int(s["num_samples"]), s["sha256"]) for s in data["shards"])
        return cls(int(data["seq_len"]), np.dtype(data["dtype"]), int(data["eos_id"]), shards,
                   data["tokenizer"], data)


def read_index(root: str) -> ShardIndex:
    """Read `root`/index.json; `root` is a local directory or an fsspec URL."""
    url = root.rstrip("/") + "/" + INDEX_FILE
    try:
        with fsspec.open(url, "r", encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{url}: no shard index here; run `mptkit data prepare` first") from e
    return ShardIndex.from_json(data, url)


def sequence_ids(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """Document number of every token of a packed sample, from 0; an EOS belongs to the document it
    ends. (B.., L) -> (B.., L) int64."""
    is_eos = tokens == eos_id
    return np.cumsum(is_eos, axis=-1, dtype=np.int64) - is_eos
