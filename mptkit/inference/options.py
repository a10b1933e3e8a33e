"""How a model is loaded and sampled for generation: typed options (`ModelOptions`,
`SamplingParams`), their command-line form (shared by `mptkit generate`, `chat` and `serve`), and
the decoder they build. Free of torch at import, so that the commands' --help prints at once."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # names mptkit.loading.resolve_dtype takes
QUANTIZATIONS = ("int8",)
DEFAULT_PREFILL_CHUNK = 256  # prompt tokens per iteration of the continuous batcher (padding included)


@dataclass(frozen=True)
class ModelOptions:
    model: str  # an HF-format directory or a training checkpoint (see mptkit.loading)
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    max_seq_len: int | None = None
    compile: bool = False
    quantize: str | None = None
    adapter: str | None = None  # a PEFT LoRA adapter directory (or hub name), merged into the model when loaded
    revision: str | None = None  # of a hub name: a branch, tag or commit

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ModelOptions":
        return cls(model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device,
                   max_seq_len=args.max_seq_len, compile=args.compile, quantize=args.quantize, adapter=args.adapter,
                   revision=args.revision)


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings; `temperature == 0` means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut; 0 keeps only the most likely token
    repetition_penalty: float = 1.0  # CTRL's penalty: >1 discourages tokens already present
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None

    def __post_init__(self):
        def fail(name, expected):
            raise ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            fail("max_new_tokens", "an integer >= 1")
        if not _is_number(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            fail("temperature", "a number in [0, 100]")
        if not _is_int(self.top_k) or self.top_k < 0:
            fail("top_k", "an integer >= 0 (0 turns it off)")
        if not _is_number(self.top_p) or not 0.0 <= self.top_p <= 1.0:
            fail("top_p", "a number in [0, 1]")
        if not _is_number(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 100.0:
            fail("repetition_penalty", "a number in (0, 100]")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            fail("stop", "a sequence of non-empty strings")
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.seed is not None and not _is_int(self.seed):
            fail("seed", "an integer or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ModelOptions(model="")
    parser.add_argument("model", help="a model: an HF-format directory, a training checkpoint (or their directory), a Composer / llm-foundry checkpoint file, or a hub name org/name[@revision] (downloaded into the hub cache)")
    parser.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: the model's)")
    parser.add_argument("--dtype", default=defaults.dtype, choices=DTYPE_CHOICES,
                        help="auto: bf16 where the hardware has it, else fp32")
    parser.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--max-seq-len", type=int, help="raise the context window (ALiBi extrapolation)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the one-token decode step (pays off for long generations)")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, help="weight-only quantization of the projections")
    parser.add_argument("--adapter", metavar="DIR",
                        help="a LoRA adapter (PEFT format, e.g. a run's output_dir/adapter, or a hub name) merged "
                             "into the model")
    parser.add_argument("--revision", help="of a hub name: a branch, tag or commit (default: main)")


def build_generator(options: ModelOptions):
    """(Decoder, tokenizer) for `options`."""
    from mptkit.inference.decode import Decoder, quantize_int8
    from mptkit.loading import load

    if options.quantize is not None and options.quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize {options.quantize!r}: expected one of {', '.join(QUANTIZATIONS)}")
    loaded = load(options.model, dtype=options.dtype, device=options.device, tokenizer=options.tokenizer,
                  max_seq_len=options.max_seq_len, adapter=options.adapter, revision=options.revision)
    model = quantize_int8(loaded.model) if options.quantize == "int8" else loaded.model
    return Decoder(model, compile=options.compile), loaded.tokenizer
