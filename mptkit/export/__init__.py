"""Exports: a model from any source `mptkit.loading` reads, written in a format other runtimes load
(hf.py: the hub's HF layout with the model's own source files, which vLLM and transformers load;
gguf.py: one GGUF file for llama.cpp, Ollama and LM Studio, written with the `gguf` package)."""
