"""How a model is loaded for generation: typed options, their command-line form (shared by
`mptkit generate`, `chat` and `serve`), and the decoder they build."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from mptkit.loading import DTYPE_CHOICES

QUANTIZATIONS = ("int8",)


@dataclass(frozen=True)
class ModelOptions:
    model: str  # an HF-format directory or a training checkpoint (see mptkit.loading)
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    max_seq_len: int | None = None
    compile: bool = False
    quantize: str | None = None
    adapter: str | None = None  # a PEFT LoRA adapter directory, merged into the model when loaded

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ModelOptions":
        return cls(model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device,
                   max_seq_len=args.max_seq_len, compile=args.compile, quantize=args.quantize, adapter=args.adapter)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ModelOptions(model="")
    parser.add_argument("model", help="HF-format model directory, training checkpoint directory, or Composer / llm-foundry checkpoint file")
    parser.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: the model's)")
    parser.add_argument("--dtype", default=defaults.dtype, choices=DTYPE_CHOICES,
                        help="auto: bf16 where the hardware has it, else fp32")
    parser.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--max-seq-len", type=int, help="raise the context window (ALiBi extrapolation)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the one-token decode step (pays off for long generations)")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, help="weight-only quantization of the projections")
    parser.add_argument("--adapter", metavar="DIR",
                        help="a LoRA adapter (PEFT format, e.g. a run's output_dir/adapter) merged into the model")


def build_generator(options: ModelOptions):
    """(Decoder, tokenizer) for `options`."""
    from mptkit.inference.decode import Decoder, quantize_int8
    from mptkit.loading import load

    if options.quantize is not None and options.quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize {options.quantize!r}: expected one of {', '.join(QUANTIZATIONS)}")
    loaded = load(options.model, dtype=options.dtype, device=options.device, tokenizer=options.tokenizer,
                  max_seq_len=options.max_seq_len, adapter=options.adapter)
    model = quantize_int8(loaded.model) if options.quantize == "int8" else loaded.model
    return Decoder(model, compile=options.compile), loaded.tokenizer
