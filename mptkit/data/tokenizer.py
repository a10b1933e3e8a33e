"""Tokenizers: the bundled GPT-NeoX-20B tokenizer, local HF tokenizers, and training a new one.

Every tokenizer mptkit hands out follows the conventions of MosaicML's MPT tokenizers: `<|endoftext|>` is
bos, eos and unk, the pad token is eos, padding is on the left (for batched generation; training
collators pad on the right themselves), and the ChatML markers `<|im_start|>` / `<|im_end|>` exist as
special tokens (added after the base vocabulary when missing, as mpt-7b-chat did), with
mpt-7b-chat's ChatML `chat_template` unless the tokenizer already has a template of its own.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mptkit.data.defaults import DEFAULT_MIN_FREQUENCY
from mptkit.data.errors import DEFAULT_ON_ERROR
from mptkit.data.sources import DEFAULT_TEXT_FIELD
from mptkit.data.templates import CHATML_CHAT_TEMPLATE, ENDOFTEXT, IM_END, IM_START
from mptkit.files import staged

BUNDLED_TOKENIZER_FILE = "gpt-neox-20b-tokenizer.json"
# Names that mean the bundled file (MPT configs say tokenizer_name: EleutherAI/gpt-neox-20b).
BUNDLED_TOKENIZER_NAMES = ("EleutherAI/gpt-neox-20b", "gpt-neox-20b")
PADDING_TOKEN = "<|padding|>"
CHATML_TOKENS = (IM_START, IM_END)
# Ids 0..3 of a tokenizer trained by `train_tokenizer`.
TRAINED_SPECIAL_TOKENS = (ENDOFTEXT, PADDING_TOKEN, IM_START, IM_END)
VOCAB_MULTIPLE = 128


def bundled_tokenizer_path() -> Path:
    return Path(str(resources.files("mptkit") / "assets" / BUNDLED_TOKENIZER_FILE))


def _from_tokenizer_file(path: str | Path) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_file=str(path))


def _resolve(name_or_path: str | None) -> PreTrainedTokenizerFast:
    if name_or_path is None or name_or_path in BUNDLED_TOKENIZER_NAMES:
        return _from_tokenizer_file(bundled_tokenizer_path())
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return _from_tokenizer_file(path)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"{path}: expected a tokenizer directory with tokenizer.json")
        if (path / "tokenizer_config.json").is_file():
            # Not AutoTokenizer: it may read the model's config.json beside the tokenizer through
            # transformers' own config class, which has nothing to say about the tokenizer.
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
        else:
            tokenizer = _from_tokenizer_file(path / "tokenizer.json")
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"tokenizer {name_or_path!r} is not a tokenizer.json file, a local tokenizer "
                f"directory, or a hub name available offline ({e})"
            ) from e
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ValueError(
            f"{name_or_path}: mptkit needs a fast (tokenizers-backed) tokenizer with a "
            f"tokenizer.json, got {type(tokenizer).__name__}"
        )
    return tokenizer


def load_tokenizer(
    name_or_path: str | None = None, *, add_chatml: bool = True, padding_side: str = "left"
) -> PreTrainedTokenizerFast:
    """Load a tokenizer with MPT's special-token conventions.

    name_or_path: None or "EleutherAI/gpt-neox-20b" for the bundled GPT-NeoX-20B tokenizer, a
    tokenizer.json file, or a local HF tokenizer directory (a hub name works only if cached).

    add_chatml: add the ChatML markers when missing and set `chat_template` to mpt-7b-chat's
    ChatML (CHATML_CHAT_TEMPLATE, which renders what `format_chatml` renders), so
    `apply_chat_template` and every `save_pretrained` copy carry it. A tokenizer that already has
    a `chat_template` (a user's own, or one saved by mptkit) keeps it.
    """
    tokenizer = _resolve(name_or_path)
    vocab = tokenizer.get_vocab()
    if ENDOFTEXT in vocab:
        for role in ("bos", "eos", "unk"):
            if getattr(tokenizer, f"{role}_token") is None:
                setattr(tokenizer, f"{role}_token", ENDOFTEXT)
    if tokenizer.eos_token is None:
        raise ValueError(
            f"tokenizer {name_or_path or 'bundled'}: expected an eos token (or {ENDOFTEXT!r} in the "
            "vocabulary) to separate documents"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if add_chatml:
        missing = [t for t in CHATML_TOKENS if t not in vocab]
        if missing:
            # Passing the existing extra special tokens along keeps them flagged special: the
            # list given here replaces the old one (transformers 4 and 5 alike).
            named = {getattr(tokenizer, f"{r}_token") for r in ("bos", "eos", "unk", "pad", "sep", "cls", "mask")}
            extra = [t for t in tokenizer.all_special_tokens if t not in named]
            tokenizer.add_special_tokens({"additional_special_tokens": extra + missing})
        if not tokenizer.chat_template:
            tokenizer.chat_template = CHATML_CHAT_TEMPLATE
    tokenizer.padding_side = padding_side
    return tokenizer


def padded_vocab_size(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """`n` rounded up to a multiple of `multiple` (MPT pads 50,277 to 50,432 for matmul speed)."""
    return -(-n // multiple) * multiple


def tokenizer_size(tokenizer: PreTrainedTokenizerFast) -> int:
    """Number of ids the model must embed: the largest id + 1 (normally len(tokenizer))."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)


def check_vocab_fits(tokenizer: PreTrainedTokenizerFast, vocab_size: int) -> None:
    """Raise ValueError when the tokenizer produces ids the model's embedding cannot hold."""
    needed = tokenizer_size(tokenizer)
    if needed > vocab_size:
        raise ValueError(
            f"tokenizer has {needed} tokens but the model's vocab_size is {vocab_size}: ids "
            f">= {vocab_size} would index past the embedding. Use vocab_size >= "
            f"{padded_vocab_size(needed)} (padded to a multiple of {VOCAB_MULTIPLE}) or a smaller "
            "tokenizer."
        )


def plain_backend(tokenizer: PreTrainedTokenizerFast) -> Tokenizer:
    """A copy of the Rust tokenizer with truncation and padding off: data preparation must see
    every token (a tokenizer.json may come with truncation enabled)."""
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    return backend


def backend_fingerprint(backend: Tokenizer) -> str:
    """sha256 of a Rust tokenizer's serialization (vocabulary, merges, added tokens, pipeline)."""
    return "sha256:" + hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """Identifies the token mapping, not runtime truncation/padding settings; recorded in shard
    metadata to catch a mismatched tokenizer."""
    return backend_fingerprint(plain_backend(tokenizer))


def train_tokenizer(
    files: Sequence[str] | str,
    vocab_size: int,
    out_dir: str | os.PathLike,
    *,
    text_field: str = DEFAULT_TEXT_FIELD,
    min_frequency: int = DEFAULT_MIN_FREQUENCY,
    on_error: str = DEFAULT_ON_ERROR,
    progress: bool = True,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of the GPT-NeoX kind on text/JSONL/parquet inputs and save it as an
    HF tokenizer directory in `out_dir` (load it back with `load_tokenizer(out_dir)`).

    Same pipeline as GPT-NeoX-20B: NFC normalizer, ByteLevel pre-tokenizer without prefix space,
    ByteLevel decoder. Special tokens take ids 0..3: <|endoftext|>, <|padding|>, <|im_start|>,
    <|im_end|>.
    """
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    from mptkit.data.errors import ErrorPolicy
    from mptkit.data.sources import iter_texts, resolve_inputs

    minimum = 256 + len(TRAINED_SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (256 bytes + special tokens), got {vocab_size}")
    policy = ErrorPolicy(on_error)
    sources = resolve_inputs([files] if isinstance(files, str) else list(files))

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(TRAINED_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    texts: Iterable[str] = iter_texts(sources, text_field, policy)
    backend.train_from_iterator(texts, trainer=trainer)
    policy.log_summary("tokenizer training input")

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        additional_special_tokens=list(CHATML_TOKENS),
        chat_template=CHATML_CHAT_TEMPLATE,  # saved with it, not only set when loaded back
    )
    with staged(Path(out_dir), len(backend.to_str())) as temp:  # the tokenizer.json is nearly all of it
        wrapped.save_pretrained(str(temp))
    return load_tokenizer(str(out_dir))
