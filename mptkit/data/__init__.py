"""Data pipeline: tokenizer (tokenizer.py), pretraining shards (prepare.py, shards.py), the
streaming loader (streaming.py), fine-tuning datasets (finetune.py, templates.py), input readers
(sources.py) and bad-input reporting (errors.py). Nothing is imported here, so `import mptkit.data.X`
loads only what X needs."""
