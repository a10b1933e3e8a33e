"""Inference: sampling (sampling.py), the static-cache fast decoder (decode.py), incremental text
with stop handling (text.py), model loading (loading.py) and the generate/chat CLIs (commands.py).
Nothing is imported here, so `import mptkit.inference.X` loads only what X needs."""
