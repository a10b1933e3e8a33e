"""The serve area's defaults and choices that `mptkit serve --help` shows, kept free of torch and
transformers so that the help prints at once; the modules that use them import them from here."""

from __future__ import annotations

DEFAULT_MAX_BATCH_SIZE = 8  # requests decoded together (the continuous engine's slots)
DEFAULT_MAX_QUEUE = 256  # requests waiting for a slot before new ones get 429
DEFAULT_MAX_BODY_BYTES = 2**20  # larger request bodies get 413 (the app's limit; here, free of fastapi)
