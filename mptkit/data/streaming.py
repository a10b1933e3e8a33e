"""Deterministic, resumable streaming over pretraining shards (local directory or fsspec URL).

Order. The global sample order of epoch e depends only on (seed, e): shards are permuted, grouped
into blocks of about `shuffle_block_samples` samples, and samples are permuted inside each block
(a full shuffle when the data fits in one block; the block bound keeps memory and remote shard
downloads local for huge corpora). Global position p of the stream is sample order_e[p mod N] with
e = p div N, so epochs follow each other without a gap.

Split. Rank r of W reads global positions start + r, start + r + W, ... ("rank items"). With a
per-rank batch b and global batch B = b*W, step t on every rank together covers exactly the global
positions [start + t*B, start + (t+1)*B): a 1-rank run with batch B sees the same samples at each
step as a W-rank run. DataLoader workers deal out a rank's items in whole batches (worker w takes
batches w, w+K, ...), which is the order in which the DataLoader returns them, so workers change
nothing either.

Resume. `state_dict()` is {seed, epoch, sample_in_epoch}: the number of global samples consumed.
Loading it (under any world size) continues at exactly the next global position. Consumption is
counted where batches are consumed: by the dataset itself when iterated in the main process, or by
`make_dataloader`'s loader when workers prefetch ahead.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mptkit.data.shards import ShardIndex, read_index, sequence_ids

DEFAULT_SHUFFLE_BLOCK_SAMPLES = 1 << 18  # 512M tokens at seq_len 2048


class StreamingTokenDataset(IterableDataset):
    """Packed pretraining samples as {"input_ids": LongTensor[seq_len], "sequence_id": LongTensor[seq_len]}.

    path_or_url: a shard directory written by `mptkit data prepare`, local or any fsspec URL
      (remote shards are downloaded once into `cache_dir`, then memory-mapped).
    epochs: None streams forever; an int stops after that many epochs, every rank yielding the same
      number of items (the last fewer-than-W positions are left out).
    batch_size: the per-rank DataLoader batch size; needed only for num_workers > 1 (see module doc).
    """

    def __init__(
        self,
        path_or_url: str | os.PathLike,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        epochs: int | None = None,
        batch_size: int = 1,
        shuffle_block_samples: int = DEFAULT_SHUFFLE_BLOCK_SAMPLES,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be None or positive, got {epochs}")
        if batch_size < 1 or shuffle_block_samples < 1:
            raise ValueError("batch_size and shuffle_block_samples must be positive")
        self.root = str(path_or_url).rstrip("/")
        self.index: ShardIndex = read_index(self.root)
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.epochs, self.batch_size, self.shuffle_block_samples = epochs, batch_size, shuffle_block_samples
        self.seq_len = self.index.seq_len
        self.num_samples = self.index.num_samples
        if self.num_samples == 0:
            raise ValueError(f"{self.root}: the shard index lists no samples")
        self._shard_starts = np.cumsum([0] + [s.num_samples for s in self.index.shards])
        fs, path = fsspec.core.url_to_fs(self.root)
        self._fs, self._fs_root = fs, path
        self._local = isinstance(fs, LocalFileSystem)
        self._cache_dir = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "mptkit-shards" / \
            hashlib.sha256(self.root.encode()).hexdigest()[:16]
        self._maps: dict[int, np.ndarray] = {}
        self._order_cache: tuple | None = None  # (epoch, *_epoch_layout(epoch))
        self._block_cache: tuple[int, int, np.ndarray] | None = None  # epoch, block, permutation
        self.start = 0  # global position where the next iteration begins
        self._consumed = 0  # rank items consumed since `start`
        self._loader_counts = False  # set while make_dataloader's loader starts its workers

    def __getstate__(self) -> dict:
        # Worker processes open their own memory maps.
        return self.__dict__ | {"_maps": {}}

    # ---- state ----------------------------------------------------------------------------
    @property
    def position(self) -> int:
        """Global position of the next unconsumed sample."""
        return self.start + self._consumed * self.world_size

    def state_dict(self) -> dict:
        epoch, sample_in_epoch = divmod(self.position, self.num_samples)
        return {"seed": self.seed, "epoch": int(epoch), "sample_in_epoch": int(sample_in_epoch),
                "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_samples", self.num_samples) != self.num_samples:
            raise ValueError(f"{self.root}: the state is of a dataset with {state['num_samples']} samples, "
                             f"this one has {self.num_samples}")
        self.seed = int(state["seed"])
        self.start = int(state["epoch"]) * self.num_samples + int(state["sample_in_epoch"])
        self._consumed = 0

    def mark_consumed(self, rank_items: int) -> None:
        """Record that `rank_items` more items of this rank were consumed (used by the loader)."""
        self._consumed += rank_items

    # ---- order ----------------------------------------------------------------------------
    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(block starts incl. the end, shard order, end of each ordered shard) of an epoch, as
        positions in the epoch's shard order."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            n_shards = len(self.index.shards)
            order = (np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(n_shards)
                     if self.shuffle else np.arange(n_shards))
            ends = np.cumsum([self.index.shards[i].num_samples for i in order])
            starts = [0]
            for end in ends:  # close a block once it holds enough samples
                if end - starts[-1] >= self.shuffle_block_samples:
                    starts.append(int(end))
            if starts[-1] != ends[-1]:
                starts.append(int(ends[-1]))
            self._order_cache = (epoch, np.array(starts), order, ends)
        return self._order_cache[1:]

    def sample_index(self, global_position: int) -> int:
        """Index (in shard-file order) of the sample at a global stream position."""
        epoch, p = divmod(global_position, self.num_samples)
        if not self.shuffle:
            return p
        block_starts, order, ends = self._epoch_layout(epoch)
        block = int(np.searchsorted(block_starts, p, side="right")) - 1
        lo, hi = int(block_starts[block]), int(block_starts[block + 1])
        if self._block_cache is None or self._block_cache[:2] != (epoch, block):
            perm = np.random.Generator(np.random.PCG64([self.seed, epoch, block + 1])).permutation(hi - lo)
            self._block_cache = (epoch, block, perm)
        q = lo + int(self._block_cache[2][p - lo])  # position in the epoch's shard order
        k = int(np.searchsorted(ends, q, side="right"))
        shard = int(order[k])
        return int(self._shard_starts[shard]) + q - (int(ends[k]) - self.index.shards[shard].num_samples)

    # ---- reading --------------------------------------------------------------------------
    def _shard_array(self, shard: int) -> np.ndarray:
        if shard not in self._maps:
            info = self.index.shards[shard]
            remote = f"{self._fs_root}/{info.file}"
            if self._local:
                path = Path(remote)
            else:
                path = self._cache_dir / info.file
                if not path.exists() or path.stat().st_size != info.num_samples * self.seq_len * self.index.dtype.itemsize:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                    self._fs.get_file(remote, str(tmp))
                    os.replace(tmp, path)
            self._maps[shard] = np.memmap(path, dtype=self.index.dtype, mode="r",
                                          shape=(info.num_samples, self.seq_len))
        return self._maps[shard]

    def sample(self, index: int) -> np.ndarray:
        """Tokens of sample `index` (in shard order) as int64."""
        shard = int(np.searchsorted(self._shard_starts, index, side="right")) - 1
        return np.asarray(self._shard_array(shard)[index - int(self._shard_starts[shard])], dtype=np.int64)

    def _rank_items(self) -> int | None:
        """Number of items this rank yields from `start` (None: unbounded)."""
        if self.epochs is None:
            return None
        return max(0, self.epochs * self.num_samples - self.start) // self.world_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        workers, worker_id = (1, 0) if worker is None else (worker.num_workers, worker.id)
        if worker is not None and not self._loader_counts:
            raise RuntimeError("StreamingTokenDataset in DataLoader workers: build the loader with "
                               "mptkit.data.streaming.make_dataloader so that state_dict() counts what "
                               "was consumed (and workers keep the batch order)")
        if worker is None:  # count here only when iterated in the main process
            self.start, self._consumed = self.position, 0
        total = self._rank_items()
        base = self.start + self.rank
        b = self.batch_size
        chunk = worker_id
        while True:
            for k in range(chunk * b, (chunk + 1) * b):
                if total is not None and k >= total:
                    return
                tokens = self.sample(self.sample_index(base + k * self.world_size))
                if worker is None:
                    self._consumed += 1
                yield {"input_ids": torch.from_numpy(tokens),
                       "sequence_id": torch.from_numpy(sequence_ids(tokens, self.index.eos_id))}
            chunk += workers


class _CountingDataLoader(DataLoader):
    """Counts consumed samples in the main process for a dataset read by worker processes."""

    def __iter__(self):
        dataset: StreamingTokenDataset = self.dataset
        dataset.start, dataset._consumed = dataset.position, 0
        dataset._loader_counts = True  # copied into the workers started here
        try:
            batches = super().__iter__()
        finally:
            dataset._loader_counts = False
        for batch in batches:
            dataset.mark_consumed(len(batch["input_ids"]))
            yield batch


def make_dataloader(dataset: StreamingTokenDataset, batch_size: int, *, num_workers: int = 0,
                    **kwargs) -> DataLoader:
    """A DataLoader over `dataset` that keeps `dataset.state_dict()` exact, with or without workers."""
    if kwargs.get("persistent_workers"):
        raise ValueError("persistent workers would keep reading from where the previous iteration's "
                         "workers stopped, not from the dataset's state; leave persistent_workers off")
    dataset.batch_size = batch_size
    if num_workers == 0:
        return DataLoader(dataset, batch_size=batch_size, **kwargs)
    return _CountingDataLoader(dataset, batch_size=batch_size, num_workers=num_workers, **kwargs)
