"""The export area's defaults and choices that `mptkit export --help` shows, kept free of torch and
transformers so that the help prints at once; the modules that use them import them from here."""

from __future__ import annotations

EXPORT_DTYPES = ("float32", "bfloat16", "float16")  # the HF export's weights
OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # GGUF tensor types
DEFAULT_OUTTYPE = "f16"
