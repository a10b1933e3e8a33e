"""`mptkit tokenizer train|info` and `mptkit data prepare|inspect`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from mptkit.data.defaults import DEFAULT_MIN_FREQUENCY, DEFAULT_SEQ_LEN, DEFAULT_SHARD_BYTES, FORMATS, TRAIN_ON
from mptkit.data.errors import DEFAULT_ON_ERROR, ON_ERROR_CHOICES, DataError
from mptkit.data.sources import DEFAULT_TEXT_FIELD
from mptkit.files import DiskFullError


def _tokenizer_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mptkit tokenizer", description="Train or inspect a tokenizer.")
    sub = parser.add_subparsers(dest="action", required=True)
    train = sub.add_parser("train", help="train a byte-level BPE (GPT-NeoX kind) on a corpus")
    train.add_argument("inputs", nargs="+", help="text/JSONL/parquet files, directories, globs or URLs")
    train.add_argument("--out", required=True, help="directory for the HF tokenizer files")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--text-field", default=DEFAULT_TEXT_FIELD, help="JSONL field / parquet column holding the text")
    train.add_argument("--min-frequency", type=int, default=DEFAULT_MIN_FREQUENCY)
    train.add_argument("--on-error", choices=ON_ERROR_CHOICES, default=DEFAULT_ON_ERROR)
    info = sub.add_parser("info", help="special tokens, sizes and fingerprint of a tokenizer")
    info.add_argument("tokenizer", nargs="?", default=None,
                      help="tokenizer.json, HF tokenizer directory (default: bundled GPT-NeoX-20B)")
    info.add_argument("--model-vocab-size", type=int, help="also check that it fits a model of this vocab_size")
    info.add_argument("--text", default="Hello world! <|im_start|>user", help="text to show the encoding of")
    return parser


def _data_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mptkit data", description="Prepare and inspect training data.")
    sub = parser.add_subparsers(dest="action", required=True)
    prep = sub.add_parser("prepare", help="tokenize corpora into fixed-length pretraining shards")
    prep.add_argument("inputs", nargs="*", help="text/JSONL/parquet files, directories, globs or fsspec URLs")
    prep.add_argument("--out", required=True, help="output shard directory")
    prep.add_argument("--tokenizer", default=None, help="tokenizer.json or HF tokenizer directory (default: GPT-NeoX-20B)")
    prep.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    prep.add_argument("--text-field", default=DEFAULT_TEXT_FIELD, help="JSONL field / parquet column holding the text")
    prep.add_argument("--samples-per-shard", type=int, default=None,
                      help=f"default: ~{DEFAULT_SHARD_BYTES >> 20} MiB shards")
    prep.add_argument("--hf-dataset", default=None,
                      help="a `datasets` dataset (saved directory or hub name) to read besides INPUTS")
    prep.add_argument("--hf-split", default="train")
    prep.add_argument("--on-error", choices=ON_ERROR_CHOICES, default=DEFAULT_ON_ERROR)
    prep.add_argument("--overwrite", action="store_true", help="replace existing shards instead of resuming")
    prep.add_argument("--no-progress", action="store_true")
    inspect = sub.add_parser("inspect", help="summarise a shard directory or fine-tuning JSONL")
    inspect.add_argument("path", help="shard directory/URL, or fine-tuning .jsonl file(s)", nargs="+")
    inspect.add_argument("--samples", type=int, default=2, help="how many samples/examples to show")
    inspect.add_argument("--chars", type=int, default=400, help="characters shown per sample")
    inspect.add_argument("--tokenizer", default=None)
    inspect.add_argument("--max-seq-len", type=int, default=2048, help="fine-tuning files: sequence length")
    inspect.add_argument("--format", default=FORMATS[0], choices=FORMATS)
    inspect.add_argument("--train-on", default=TRAIN_ON[0], choices=TRAIN_ON)
    inspect.add_argument("--packing", action="store_true")
    inspect.add_argument("--on-error", choices=ON_ERROR_CHOICES, default=DEFAULT_ON_ERROR)
    return parser


def _hf_dataset(name: str, split: str):
    try:
        import datasets
    except ImportError as e:
        raise SystemExit("--hf-dataset needs the `datasets` package: pip install datasets") from e
    if Path(name).is_dir():
        loaded = datasets.load_from_disk(name)
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    return datasets.load_dataset(name, split=split)


def _tokenizer_main(args: argparse.Namespace) -> int:
    from mptkit.data.tokenizer import (
        check_vocab_fits,
        load_tokenizer,
        padded_vocab_size,
        tokenizer_fingerprint,
        tokenizer_size,
        train_tokenizer,
    )

    if args.action == "train":
        tok = train_tokenizer(args.inputs, args.vocab_size, args.out, text_field=args.text_field,
                              min_frequency=args.min_frequency, on_error=args.on_error)
        print(f"wrote {args.out}: {len(tok)} tokens (model vocab_size {padded_vocab_size(tokenizer_size(tok))})")
        return 0
    tok = load_tokenizer(args.tokenizer)
    size = tokenizer_size(tok)
    special = {name: (getattr(tok, f"{name}_token"), getattr(tok, f"{name}_token_id"))
               for name in ("bos", "eos", "unk", "pad")}
    print(f"tokenizer:        {args.tokenizer or 'bundled GPT-NeoX-20B'} ({type(tok).__name__})")
    print(f"tokens:           {size} -> model vocab_size {padded_vocab_size(size)} (multiple of 128)")
    for name, (token, token_id) in special.items():
        print(f"{name + ':':<17} {token!r} = {token_id}")
    extra = [t for t in tok.all_special_tokens if t not in {s[0] for s in special.values()}]
    print(f"extra special:    {', '.join(f'{t!r} = {tok.convert_tokens_to_ids(t)}' for t in extra)}")
    print(f"padding side:     {tok.padding_side}")
    print(f"fingerprint:      {tokenizer_fingerprint(tok)}")
    ids = tok(args.text, add_special_tokens=False)["input_ids"]
    print(f"encode {args.text!r}: {ids} {tok.convert_ids_to_tokens(ids)}")
    if args.model_vocab_size is not None:
        check_vocab_fits(tok, args.model_vocab_size)
        print(f"fits a model with vocab_size {args.model_vocab_size}")
    return 0


def _inspect_shards(args: argparse.Namespace, root: str) -> int:
    from mptkit.data.shards import read_index, sequence_ids
    from mptkit.data.streaming import StreamingTokenDataset
    from mptkit.data.tokenizer import load_tokenizer

    index = read_index(root)
    raw = index.raw
    print(f"{root}: {raw['num_samples']} samples x {raw['seq_len']} tokens = {raw['num_tokens']} tokens "
          f"in {len(raw['shards'])} shard(s), {raw['dtype']}")
    print(f"documents {raw['documents']}, tokenized {raw['tokens_tokenized']} (tail dropped "
          f"{raw['dropped_tail_tokens']}), tokenizer {raw['tokenizer']['name']} {raw['tokenizer']['fingerprint'][:19]}...")
    skipped = raw["skipped"]
    print(f"skipped: {skipped['count']} {skipped['by_kind'] or ''}")
    for example in skipped["examples"][:5]:
        print(f"  {example}")
    for source in raw["sources"][:20]:
        print(f"  {source['name']}: {source['documents']} docs, {source['tokens']} tokens")
    if len(raw["sources"]) > 20:
        print(f"  ... {len(raw['sources']) - 20} more sources")
    if args.samples:
        tok = load_tokenizer(args.tokenizer)
        dataset = StreamingTokenDataset(root, shuffle=False)
        for i in range(min(args.samples, dataset.num_samples)):
            tokens = dataset.sample(i)
            docs = int(sequence_ids(tokens, index.eos_id)[-1]) + 1
            print(f"--- sample {i} ({docs} document(s)) ---")
            print(tok.decode(tokens.tolist())[: args.chars])
    return 0


def _inspect_finetune(args: argparse.Namespace) -> int:
    from mptkit.data.finetune import IGNORE_INDEX, FinetuneDataset

    dataset = FinetuneDataset(args.path, args.tokenizer, args.max_seq_len, format=args.format,
                              train_on=args.train_on, packing=args.packing, on_error=args.on_error)
    print(dataset.report.summary())
    print(dataset.policy.summary())
    tok = dataset.tokenizer
    for i in range(min(args.samples, len(dataset))):
        item = dataset[i]
        ids, trained = item["input_ids"].tolist(), (item["labels"] != IGNORE_INDEX).tolist()
        pieces, start = [], 0
        for j in range(1, len(ids) + 1):  # trained runs shown inside [[ ]]
            if j == len(ids) or trained[j] != trained[start]:
                text = tok.decode(ids[start:j])
                pieces.append(f"[[{text}]]" if trained[start] else text)
                start = j
        print(f"--- sequence {i} ({len(ids)} tokens, trained parts in [[ ]]) ---")
        print("".join(pieces)[: args.chars * 4])
    return 0


def _data_main(args: argparse.Namespace) -> int:
    if args.action == "prepare":
        from mptkit.data.prepare import prepare_pretraining

        inputs: list = list(args.inputs)
        if args.hf_dataset:
            inputs.append(_hf_dataset(args.hf_dataset, args.hf_split))
        if not inputs:
            print("mptkit data prepare: give input files or --hf-dataset", file=sys.stderr)
            return 2
        index = prepare_pretraining(
            inputs, args.out, tokenizer=args.tokenizer, seq_len=args.seq_len, text_field=args.text_field,
            samples_per_shard=args.samples_per_shard, on_error=args.on_error, overwrite=args.overwrite,
            progress=not args.no_progress,
        )
        run = index["last_run"]
        print(f"{args.out}: {index['num_samples']} samples x {index['seq_len']} = {index['num_tokens']} tokens "
              f"in {len(index['shards'])} shard(s) from {index['documents']} documents; dropped tail "
              f"{index['dropped_tail_tokens']} tokens; this run {run['tokens']} tokens in {run['seconds']} s "
              f"({run['tokens_per_second']:,} tokens/s)")
        if index["skipped"]["count"]:
            print(f"skipped {index['skipped']['count']}: {json.dumps(index['skipped']['by_kind'])} "
                  f"(see 'skipped' in {args.out}/index.json)")
        return 0
    shard_root = args.path[0]
    if len(args.path) == 1 and not shard_root.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return _inspect_shards(args, shard_root)
    return _inspect_finetune(args)


def main(command: str, argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = _tokenizer_parser() if command == "tokenizer" else _data_parser()
    args = parser.parse_args(argv)
    try:
        return _tokenizer_main(args) if command == "tokenizer" else _data_main(args)
    except (DataError, FileExistsError, FileNotFoundError, ValueError, DiskFullError) as e:
        print(f"mptkit {command} {args.action}: {e}", file=sys.stderr)
        return 1
