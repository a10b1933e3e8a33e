"""Training batches from mptkit.data: each rank's micro-batches, with an exactly resumable position.

Both kinds of data follow one rule for the split: rank r of W takes global positions
start + r, start + r + W, ... so the samples of an optimizer step do not depend on the world size or
on the accumulation (a 1-rank run and a W-rank run with the same global batch see the same samples).
The position is global, so the saved state is the same on every rank and resumes under any world size.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mptkit.data.finetune import FinetuneDataset, collate_finetune
from mptkit.data.prepare import prepare_pretraining
from mptkit.data.shards import INDEX_FILE
from mptkit.data.streaming import StreamingTokenDataset
from mptkit.data.tokenizer import load_tokenizer

from .config import RunConfig
from .parallel import DistributedEnv, barrier


def _shard_directory(paths: list[str], split: str, config: RunConfig, seq_len: int, env: DistributedEnv) -> str:
    """A shard directory: `paths` itself if it is one, else the text they name, tokenized once
    (by rank 0, into output_dir/data/) into samples of seq_len tokens."""
    if len(paths) == 1 and (Path(paths[0]) / INDEX_FILE).is_file():
        return paths[0]  # its samples' length was checked against seq_len when the run was resolved
    out = Path(config.output_dir) / "data" / f"{split}-seq{seq_len}"
    if env.is_main:
        prepare_pretraining(paths, out, tokenizer=config.data.tokenizer, seq_len=seq_len, progress=True)
    barrier(env)
    return str(out)


class PretrainBatches:
    """Micro-batches of packed token windows: input_ids, labels (= input_ids), sequence_id."""

    def __init__(self, shard_dir: str, micro_batch_size: int, seed: int, shuffle: bool, env: DistributedEnv):
        self.dataset = StreamingTokenDataset(shard_dir, seed=seed, shuffle=shuffle, rank=env.rank,
                                             world_size=env.world_size)
        self.micro_batch_size = micro_batch_size
        self._items = None

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self._items is None:
            self._items = iter(self.dataset)  # streams forever, epoch after epoch
        rows = [next(self._items) for _ in range(self.micro_batch_size)]
        input_ids = torch.stack([row["input_ids"] for row in rows])
        return {"input_ids": input_ids, "labels": input_ids, "sequence_id": torch.stack([r["sequence_id"] for r in rows])}

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)
        self._items = None

    def batches(self, max_batches: int):
        """The first max_batches micro-batches from the start (validation: same every time)."""
        self.load_state_dict({"seed": self.dataset.seed, "epoch": 0, "sample_in_epoch": 0})
        available = self.dataset.num_samples // (self.micro_batch_size * self.dataset.world_size)
        for _ in range(min(max_batches, max(available, 1))):
            yield self.next_batch()


class FinetuneBatches:
    """Micro-batches of tokenized fine-tuning examples, right-padded, in a seeded order per epoch."""

    def __init__(self, dataset: FinetuneDataset, micro_batch_size: int, seed: int, shuffle: bool,
                 env: DistributedEnv):
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = env.rank, env.world_size
        self.position = 0  # global position in the endless stream of epochs
        self._order_epoch, self._order = -1, None

    def _order_of(self, epoch: int) -> torch.Tensor:
        if epoch != self._order_epoch:
            n = len(self.dataset)
            self._order = (torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
                           if self.shuffle else torch.arange(n))
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> dict[str, torch.Tensor]:
        n = len(self.dataset)
        rows = []
        for k in range(self.micro_batch_size):
            epoch, index = divmod(self.position + self.rank + k * self.world_size, n)
            rows.append(self.dataset[int(self._order_of(epoch)[index])])
        self.position += self.micro_batch_size * self.world_size
        return collate_finetune(rows, self.dataset.pad_id)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "position": self.position, "num_examples": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        if state["num_examples"] != len(self.dataset):
            raise ValueError(f"the checkpoint's data position is for {state['num_examples']} fine-tuning sequences; "
                             f"the configured data has {len(self.dataset)}")
        self.seed, self.position = state["seed"], state["position"]

    def batches(self, max_batches: int):
        self.position = 0
        available = len(self.dataset) // (self.micro_batch_size * self.world_size)
        for _ in range(min(max_batches, max(available, 1))):
            yield self.next_batch()


def _finetune_dataset(files: list[str], config: RunConfig, seq_len: int) -> FinetuneDataset:
    data = config.data
    return FinetuneDataset(files, load_tokenizer(data.tokenizer), seq_len, format=data.format, train_on=data.train_on,
                           train_on_prompt=data.train_on_prompt, packing=data.packing)


def build_train_stream(config: RunConfig, seq_len: int, env: DistributedEnv):
    data, train = config.data, config.train
    if data.kind == "pretrain":
        shards = _shard_directory(data.train, "train", config, seq_len, env)
        return PretrainBatches(shards, train.micro_batch_size, config.seed, data.shuffle, env)
    return FinetuneBatches(_finetune_dataset(data.train, config, seq_len), train.micro_batch_size, config.seed,
                           data.shuffle, env)


def build_val_source(config: RunConfig, seq_len: int, env: DistributedEnv):
    """Validation micro-batches (unshuffled), or None without data.val."""
    data = config.data
    if not data.val:
        return None
    micro = config.eval.micro_batch_size or config.train.micro_batch_size
    if data.kind == "pretrain":
        shards = _shard_directory(data.val, "val", config, seq_len, env)
        return PretrainBatches(shards, micro, config.seed, False, env)
    return FinetuneBatches(_finetune_dataset(data.val, config, seq_len), micro, config.seed, False, env)
