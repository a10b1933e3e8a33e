"""Inference: sampling (sampling.py), the static-cache fast decoder (decode.py), incremental text
with stop handling (text.py), templates and stop tokens (prompts.py), how a model is loaded for
generation (options.py; the loading itself is mptkit.loading) and the generate/chat CLIs (commands.py).
Nothing is imported here, so `import mptkit.inference.X` loads only what X needs."""
