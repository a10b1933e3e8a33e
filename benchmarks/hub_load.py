"""`mptkit generate mosaicml/mpt-7b` from a hub cache, offline, at the real size: peak memory and load time.

Writes an mpt-7b-shaped checkpoint (random bf16 weights, 6.65 B parameters) as the hub repository
holds it: config.json with the hub's fields, two `pytorch_model-0000N-of-00002.bin` shards of the
published sizes (~9.9 GB and ~3.4 GB) with their index, the GPT-NeoX tokenizer; laid out as
huggingface_hub's cache (blobs, snapshots/<commit>, refs/main) under --cache. Then runs, in a child
process with HF_HUB_OFFLINE=1, `mptkit generate mosaicml/mpt-7b --dtype bfloat16 --prompt ...
--max-new-tokens 4` and reports the child's peak RSS (ru_maxrss) against the bf16 weights' size
(target: <= ~1.1x) and its wall time. The writer runs in this process, one shard at a time; the
cache is kept for a second run (--keep) or removed.

    .venv/bin/python benchmarks/hub_load.py --cache /tmp/mpt7b-cache       # ~27 GB of disk while it runs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mptkit.model import MPTConfig, MPTForCausalLM  # noqa: E402
from tests.hub_checkpoints import hub_fields, write_cached_repo  # noqa: E402

NAME = "mosaicml/mpt-7b"
FIRST_SHARD_BYTES = 9_943_040_000  # mosaicml/mpt-7b's pytorch_model-00001-of-00002.bin, about


def write_repo(files: Path) -> int:
    """The hub's mpt-7b files in `files`; returns the weights' bytes."""
    from mptkit.data.tokenizer import load_tokenizer

    fields = hub_fields()
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in MPTForCausalLM(MPTConfig(**fields)).state_dict().items()}
    shards, current, size = [], [], 0
    for name, shape in shapes.items():  # in model order, cut at the first shard's published size
        nbytes = 2 * int(torch.Size(shape).numel())
        if current and size + nbytes > FIRST_SHARD_BYTES and not shards:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    generator = torch.Generator().manual_seed(0)
    for index, names in enumerate(shards):
        file = f"pytorch_model-{index + 1:05d}-of-{len(shards):05d}.bin"
        state = {name: (torch.randn(shapes[name], generator=generator) * 0.02).to(torch.bfloat16) for name in names}
        torch.save(state, files / file)
        total += sum(t.numel() * 2 for t in state.values())
        weight_map.update(dict.fromkeys(names, file))
        del state
        print(f"wrote {file}: {(files / file).stat().st_size / 1e9:.2f} GB", flush=True)
    (files / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}))
    (files / "config.json").write_text(json.dumps(fields, indent=2))
    load_tokenizer().save_pretrained(str(files))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, required=True, help="a directory for the hub cache (created)")
    parser.add_argument("--keep", action="store_true", help="keep the cache for another run")
    args = parser.parse_args()
    files = args.cache / "files"
    marker = args.cache / "weights_bytes"
    if not marker.is_file():
        files.mkdir(parents=True, exist_ok=True)
        began = time.perf_counter()
        marker.write_text(str(write_repo(files)))
        write_cached_repo(args.cache / "hub", NAME, files, "7" * 40)
        shutil.rmtree(files)  # the cache holds the blobs now
        print(f"cache written in {time.perf_counter() - began:.0f} s")
    weights = int(marker.read_text())
    env = {**os.environ, "HF_HUB_CACHE": str(args.cache / "hub"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "mptkit.cli", "generate", NAME, "--dtype", "bfloat16", "--prompt",
               "Here is a recipe for vegan banana bread:", "--max-new-tokens", "4"]
    began = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if done.returncode != 0:
        raise SystemExit(f"generate failed ({done.returncode}):\n{done.stderr[-3000:]}")
    print(f"{' '.join(command[2:])}\n  weights (bf16): {weights / 2**30:.2f} GiB; peak RSS {peak / 2**30:.2f} GiB = "
          f"{peak / weights:.2f}x the weights; {seconds:.0f} s (load, 4 tokens)")
    if not args.keep:
        shutil.rmtree(args.cache)


if __name__ == "__main__":
    main()
