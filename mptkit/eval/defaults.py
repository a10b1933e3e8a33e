"""The eval area's defaults and choices that `mptkit eval --help` shows, kept free of torch and
transformers so that the help prints at once; the modules that use them import them from here."""

from __future__ import annotations

DEFAULT_BATCH_TOKENS = 1024  # more only grows the (tokens x vocab) logits; CPUs gain nothing (GPUs may)
# Evaluation reads fp32 weights; "bf16" runs the matmuls under bf16 autocast.
PRECISIONS = ("fp32", "bf16")
DEFAULT_MULTIPLES = (1, 2, 4, 8, 16)  # extrapolation lengths, as multiples of the training length
DEFAULT_STRIDE_RATIO = 0.25  # a sliding window's stride, as a fraction of its length
DEFAULT_BATCH_SIZE = 16  # multiple-choice requests per forward pass
