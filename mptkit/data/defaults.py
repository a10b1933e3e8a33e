"""The data area's defaults and choices that `mptkit data` / `mptkit tokenizer --help` shows, kept free of torch and
transformers so that the help prints at once; the modules that use them import them from here."""

from __future__ import annotations

DEFAULT_SEQ_LEN = 2048  # tokens per pretraining sample
DEFAULT_SHARD_BYTES = 1 << 26  # 64 MiB: few files, cheap to fetch one at a time
DEFAULT_MIN_FREQUENCY = 2  # BPE merges seen fewer times are not learned
FORMATS = ("auto", "prompt_response", "chat")  # fine-tuning record formats (auto: per row)
TRAIN_ON = ("last", "all")  # the last response of each example, or every assistant turn
