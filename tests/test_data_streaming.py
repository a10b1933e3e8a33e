"""Streaming loader: order, rank/worker split, resume, remote URLs (mptkit.data.streaming)."""

import gc
import itertools
import json
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mptkit.data.prepare import prepare_pretraining
from mptkit.data.shards import sequence_ids
from mptkit.data.streaming import StreamingTokenDataset, make_dataloader
from mptkit.data.tokenizer import load_tokenizer

SEQ_LEN = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """~90 samples in shards of 7 (the last one shorter), documents of varied length."""
    out = tmp_path_factory.mktemp("shards")
    docs = [f"document {i}: " + "alpha beta gamma " * (i % 5) for i in range(60)]
    index = prepare_pretraining([docs], out / "ds", tokenizer=load_tokenizer(), seq_len=SEQ_LEN,
                                samples_per_shard=7, progress=False)
    assert index["num_samples"] > 80 and index["num_samples"] % 7 != 0
    return out / "ds"


def raw_samples(root: Path) -> np.ndarray:
    """Samples read straight from the files (independent of the loader)."""
    index = json.loads((root / "index.json").read_text())
    return np.concatenate([np.fromfile(root / s["file"], dtype=index["dtype"]) for s in index["shards"]]
                          ).reshape(-1, index["seq_len"]).astype(np.int64)


def take(iterable, n):
    """The first n items, pulling no more than n from the iterator."""
    return list(itertools.islice(iterable, n))


def ids(items) -> list[tuple[int, ...]]:
    return [tuple(item["input_ids"].tolist()) for item in items]


def as_rows(batches) -> list[list[tuple[int, ...]]]:
    return [[tuple(row) for row in b["input_ids"].tolist()] for b in batches]


def test_order_is_a_seeded_permutation_per_epoch(shards):
    raw = raw_samples(shards)
    n = len(raw)
    ds = StreamingTokenDataset(shards, seed=3)
    epoch0 = [ds.sample_index(p) for p in range(n)]
    epoch1 = [ds.sample_index(p) for p in range(n, 2 * n)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1 and epoch0 != list(range(n))
    assert epoch0 == [StreamingTokenDataset(shards, seed=3).sample_index(p) for p in range(n)]
    assert epoch0 != [StreamingTokenDataset(shards, seed=4).sample_index(p) for p in range(n)]
    assert [StreamingTokenDataset(shards, shuffle=False).sample_index(p) for p in range(n)] == list(range(n))
    # What is yielded is exactly the file content of those samples.
    items = take(ds, n + 5)
    assert ids(items) == [tuple(raw[i]) for i in epoch0 + epoch1[:5]]
    assert all(item["input_ids"].dtype == torch.long and item["input_ids"].shape == (SEQ_LEN,) for item in items)


def test_shuffle_blocks_stay_within_blocks(shards):
    # Blocks of >= 20 samples: each block's positions cover whole shards, all of them once.
    ds = StreamingTokenDataset(shards, seed=0, shuffle_block_samples=20)
    n = ds.num_samples
    order = [ds.sample_index(p) for p in range(n)]
    assert sorted(order) == list(range(n))
    first_block_shards = {i // 7 for i in order[:21]}
    assert len(first_block_shards) == 3  # 3 shards of 7 close the first block


def test_sequence_id_numbers_documents():
    tokens = np.array([5, 0, 7, 8, 0, 9, 9, 0])
    assert sequence_ids(tokens, eos_id=0).tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    assert sequence_ids(np.array([0, 0, 4]), eos_id=0).tolist() == [0, 1, 2]


def test_yielded_sequence_id_matches_eos_positions(shards):
    for item in take(StreamingTokenDataset(shards, seed=1), 20):
        expected, doc = [], 0
        for token in item["input_ids"].tolist():
            expected.append(doc)
            doc += token == 0
        assert item["sequence_id"].tolist() == expected


@pytest.mark.parametrize("world_size, batch", [(2, 3), (3, 2), (4, 1)])
def test_union_over_ranks_equals_single_rank_steps(shards, world_size, batch):
    global_batch = world_size * batch
    single = as_rows(take(DataLoader(StreamingTokenDataset(shards, seed=7), batch_size=global_batch), 5))
    per_rank = [as_rows(take(DataLoader(StreamingTokenDataset(shards, seed=7, rank=r, world_size=world_size),
                                        batch_size=batch), 5)) for r in range(world_size)]
    for step in range(5):
        union = sorted(row for r in range(world_size) for row in per_rank[r][step])
        assert union == sorted(single[step])
        # Rank r holds global positions r, r+W, ...: interleaving ranks restores the order.
        interleaved = [per_rank[r][step][k] for k in range(batch) for r in range(world_size)]
        assert interleaved == single[step]


def test_workers_split_without_duplicates_and_keep_order(shards):
    reference = as_rows(take(DataLoader(StreamingTokenDataset(shards, seed=2, epochs=1), batch_size=4), 100))
    ds = StreamingTokenDataset(shards, seed=2, epochs=1)
    with_workers = as_rows(make_dataloader(ds, batch_size=4, num_workers=2))
    assert with_workers == reference
    rows = [row for batch in with_workers for row in batch]
    assert len(rows) == ds.num_samples and len(set(map(tuple, rows))) == len(set(map(tuple, raw_samples(shards))))


def test_plain_dataloader_with_workers_is_refused(shards, monkeypatch):
    # Workers of a plain DataLoader would leave state_dict() at the start: refuse loudly.
    # (A shorter status interval only makes shutting the failed worker down quicker.)
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.2)
    iterator = iter(DataLoader(StreamingTokenDataset(shards), batch_size=2, num_workers=1))
    with pytest.raises(RuntimeError, match="make_dataloader"):
        next(iterator)
    del iterator
    gc.collect()


def test_finite_epochs_give_every_rank_the_same_count(shards):
    n = StreamingTokenDataset(shards).num_samples
    assert len(list(StreamingTokenDataset(shards, epochs=2))) == 2 * n
    counts = [len(list(StreamingTokenDataset(shards, epochs=2, rank=r, world_size=3))) for r in range(3)]
    assert counts == [2 * n // 3] * 3


def test_resume_mid_epoch_at_exactly_the_next_sample(shards):
    ds = StreamingTokenDataset(shards, seed=5)
    loader = DataLoader(ds, batch_size=4)
    iterator = iter(loader)
    seen = as_rows(take(iterator, 30))  # crosses into epoch 1 (120 > num_samples)
    state = ds.state_dict()
    assert state["epoch"] * ds.num_samples + state["sample_in_epoch"] == 120
    continued = as_rows([next(iterator) for _ in range(3)])

    resumed = StreamingTokenDataset(shards, seed=999)  # the seed comes from the state
    resumed.load_state_dict(state)
    assert as_rows(take(DataLoader(resumed, batch_size=4), 3)) == continued
    assert seen  # (sanity: the first run produced batches)


def test_resume_under_a_different_world_size(shards):
    # Two ranks with batch 3 for 4 steps (24 global samples), then three ranks with batch 2.
    datasets = [StreamingTokenDataset(shards, seed=11, rank=r, world_size=2) for r in range(2)]
    for ds in datasets:
        take(DataLoader(ds, batch_size=3), 4)
    state = datasets[0].state_dict()
    assert state == datasets[1].state_dict() and state["sample_in_epoch"] == 24

    single = as_rows(take(DataLoader(StreamingTokenDataset(shards, seed=11), batch_size=6), 7))
    resumed = []
    for r in range(3):
        ds = StreamingTokenDataset(shards, seed=11, rank=r, world_size=3)
        ds.load_state_dict(state)
        resumed.append(as_rows(take(DataLoader(ds, batch_size=2), 3)))
    for step in range(3):
        assert sorted(row for r in range(3) for row in resumed[r][step]) == sorted(single[4 + step])


def test_state_is_exact_with_prefetching_workers(shards):
    ds = StreamingTokenDataset(shards, seed=8)
    loader = make_dataloader(ds, batch_size=2, num_workers=2)
    iterator = iter(loader)
    take(iterator, 5)
    state = ds.state_dict()
    assert state["sample_in_epoch"] == 10  # workers prefetched more, but 10 were consumed
    continued = as_rows([next(iterator) for _ in range(2)])
    del iterator
    resumed = StreamingTokenDataset(shards)
    resumed.load_state_dict(state)
    assert as_rows(take(DataLoader(resumed, batch_size=2), 2)) == continued


def test_reads_from_fsspec_urls(shards, tmp_path):
    local = ids(take(StreamingTokenDataset(shards, seed=4), 30))
    assert ids(take(StreamingTokenDataset(f"file://{shards}", seed=4), 30)) == local
    memory = fsspec.filesystem("memory")
    for path in shards.iterdir():
        memory.pipe(f"/mptkit-test-shards/{path.name}", path.read_bytes())
    remote = StreamingTokenDataset("memory://mptkit-test-shards", seed=4, cache_dir=tmp_path / "cache")
    assert ids(take(remote, 30)) == local
    cached = {p.name for p in (tmp_path / "cache").iterdir()}  # downloaded once, then memory-mapped
    assert cached and cached <= {f"shard-{i:05d}.bin" for i in range(13)}


def test_argument_and_state_validation(shards, tmp_path):
    with pytest.raises(ValueError, match="rank must be in"):
        StreamingTokenDataset(shards, rank=2, world_size=2)
    with pytest.raises(FileNotFoundError, match="run `mptkit data prepare` first"):
        StreamingTokenDataset(tmp_path)
    ds = StreamingTokenDataset(shards)
    with pytest.raises(ValueError, match="dataset with 5 samples"):
        ds.load_state_dict({"seed": 0, "epoch": 0, "sample_in_epoch": 0, "num_samples": 5})
