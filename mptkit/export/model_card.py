"""The model card (README.md) written with every export: hub front matter, the architecture read from
the model, the training the checkpoint records (`loading.training_record`), evaluation when the
run measured one, and how to load the files with transformers, mptkit and llama.cpp."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from mptkit.data.tokenizer import BUNDLED_TOKENIZER_NAMES
from mptkit.loading import ModelSource
from mptkit.loading.training_record import TrainingRecord

CARD_FILE = "README.md"
LICENSE = "apache-2.0"  # MPT's license, and mptkit's
EXAMPLE_PROMPT = "Here is a recipe for vegan banana bread:\n"
NO_TOKENIZER_FALLBACK = BUNDLED_TOKENIZER_NAMES[0]  # MPT's tokenizer, for an export saved without one

@dataclass(frozen=True)
class Export:
    """What was written: the kind of export and where, so the card's snippets name the real files."""

    kind: str  # "hf" or "gguf"
    location: str  # the directory the card sits in, as the user named it
    weights: str  # e.g. "float32 safetensors", "q8_0 GGUF"
    gguf_file: str | None = None  # the GGUF file's name inside `location`
    adapter: Path | None = None  # a LoRA adapter merged into the weights


def _count(number: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if number >= size:
            return f"{number / size:.1f}{unit}"
    return str(number)


def _front_matter(export: Export, chat: bool) -> str:
    tags = ["mpt", "mptkit", "alibi", "text-generation"]
    tags += ["gguf"] if export.kind == "gguf" else ["custom_code"]
    if chat:
        tags.append("conversational")
    if export.adapter is not None:
        tags.append("lora")
    library = "gguf" if export.kind == "gguf" else "transformers"
    lines = ["---", f"license: {LICENSE}", f"library_name: {library}", "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {tag}" for tag in tags]
    return "\n".join([*lines, "---"])


def _positions(config) -> str:
    attn = config.attn
    if attn.alibi:
        return (f"ALiBi (alibi_bias_max {attn.alibi_bias_max}): no position embeddings, so it runs beyond the "
                "trained context (`max_seq_len` may be raised at load time)")
    if attn.rope:
        return f"rotary (RoPE, theta {attn.rope_theta})"
    return "learned position embeddings (cannot run beyond the trained context)"


def _architecture(model, export: Export) -> str:
    config = model.config
    attn = config.attn
    parameters = sum(parameter.numel() for parameter in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    heads = f"{config.n_heads}" + (f" ({config.kv_n_heads} key/value heads)" if config.kv_n_heads != config.n_heads else "")
    ffn = "GLU" if config.ffn.ffn_type.endswith("glu") else "MLP"
    rows = [
        ("parameters", f"{_count(parameters)} ({_count(embedding)} of them the token embedding)"),
        ("blocks", str(config.n_layers)),
        ("d_model", str(config.d_model)),
        ("attention heads", heads),
        ("feed-forward", f"{ffn}, hidden size {config.ffn_hidden_size}"),
        ("vocabulary", f"{config.vocab_size} (GPT-NeoX-20B BPE, padded)"),
        ("context trained", f"{config.max_seq_len} tokens"),
        ("positions", _positions(config)),
        ("normalization", f"{config.norm_type}, eps {config.layer_norm_epsilon}, pre-LN, no biases"
                          if config.no_bias else f"{config.norm_type}, eps {config.layer_norm_epsilon}, pre-LN"),
        ("output head", "tied to the token embedding" if config.tie_word_embeddings else "untied"),
        ("weights", export.weights),
    ]
    if attn.clip_qkv is not None:
        rows.insert(-1, ("clip_qkv", str(attn.clip_qkv)))
    if attn.qk_ln:
        rows.insert(-1, ("qk_ln", "LayerNorm on queries and keys"))
    if attn.sliding_window_size > 0:
        rows.insert(-1, ("sliding window", f"{attn.sliding_window_size} tokens"))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return ("## Architecture\n\nMPT (MosaicML's architecture): a decoder-only transformer.\n\n"
            f"| | |\n|---|---|\n{table}")


def _training(source: ModelSource, record: TrainingRecord | None, export: Export) -> str:
    lines = [f"- Exported from {source.description}: `{source.reference}`."]
    if record is None:
        lines.append("- Its training is not recorded there (an HF-format directory keeps weights and config "
                     "only; the model it came from may have its own card).")
    else:
        if record.run_name:
            lines.append(f"- Run: `{record.run_name}`.")
        if record.step is not None:
            of = f" of {record.max_steps} planned" if record.max_steps else ""
            tokens = f", {record.tokens:,} tokens" if record.tokens else ""
            lines.append(f"- Trained for {record.step:,} optimizer steps{of}{tokens}.")
        if record.train_data:
            what = {"pretrain": "Pretraining", "finetune": "Fine-tuning"}.get(record.kind or "", "Training")
            lines.append(f"- {what} data: {', '.join(f'`{item}`' for item in record.train_data)}.")
        if record.global_batch_size:
            seq = f" x {record.seq_len} tokens" if record.seq_len else ""
            lines.append(f"- Batch: {record.global_batch_size} sequences{seq}; precision {record.precision}; "
                         f"optimizer {record.optimizer}.")
        if record.init_from:
            lines.append(f"- Started from `{record.init_from}`.")
        if record.lora_rank is not None:
            lines.append(f"- LoRA adapters of rank {record.lora_rank} were trained on a frozen base and merged "
                         "into these weights.")
    if export.adapter is not None:
        lines.append(f"- The LoRA adapter `{export.adapter}` is merged into these weights.")
    return "## Training\n\n" + "\n".join(lines)


def _evaluation(record: TrainingRecord | None, location: str) -> str:
    evaluation = record.evaluation if record else None
    if evaluation is None:
        return ("## Evaluation\n\nNone recorded with this checkpoint. Held-out perplexity: "
                f"`mptkit eval perplexity {location} FILE.txt`.")
    data = ", ".join(f"`{item}`" for item in record.val_data) or "the run's validation data"
    tokens = f"{evaluation.tokens:,}" if evaluation.tokens else "-"
    perplexity = math.exp(min(evaluation.loss, 50.0))
    return ("## Evaluation\n\nMeasured by the training run on held-out data:\n\n"
            "| data | step | loss (nats/token) | perplexity | tokens |\n|---|---|---|---|---|\n"
            f"| {data} | {evaluation.step:,} | {evaluation.loss:.4f} | {perplexity:.2f} | {tokens} |")


def _usage_hf(location: str, chat: bool, native: bool, tokenizer_saved: bool) -> str:
    prompt = EXAMPLE_PROMPT.encode("unicode_escape").decode()
    generate = (f'inputs = tokenizer("{prompt}", return_tensors="pt")\n'
                "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))")
    if chat:
        generate += ("\n\n# the tokenizer carries MPT-7B-Chat's ChatML template\n"
                     'messages = [{"role": "user", "content": "What is ALiBi?"}]\n'
                     "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",\n"
                     "                                       return_dict=True)\n"
                     "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))")
    native_note = ("transformers' built-in `MptForCausalLM` reads these files too, without remote code."
                   if native else "Load it with `trust_remote_code=True`: transformers' built-in MPT class ignores "
                   "some of this config's fields.")
    return f"""## How to use

With transformers (the model's code is saved beside the weights):

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{location}", trust_remote_code=True, dtype=torch.bfloat16)
tokenizer = AutoTokenizer.from_pretrained("{location if tokenizer_saved else NO_TOKENIZER_FALLBACK}")
{generate}
```

{native_note}

With mptkit:

```bash
mptkit generate {location} --prompt "Here is a recipe for vegan banana bread:"
mptkit serve {location} --port 8000      # OpenAI-compatible /v1 API
```

With llama.cpp (and tools reading GGUF: Ollama, LM Studio):

```bash
mptkit export {location} {location}-gguf/ --format gguf --outtype q8_0
llama-cli -m {location}-gguf/model-q8_0.gguf -p "Here is a recipe for vegan banana bread:"
```"""


def _usage_gguf(location: str, gguf_file: str) -> str:
    path = f"{location}/{gguf_file}"
    return f"""## How to use

With llama.cpp:

```bash
llama-cli -m {path} -p "Here is a recipe for vegan banana bread:"
```

With llama-cpp-python:

```python
from llama_cpp import Llama

llm = Llama(model_path="{path}")
print(llm("Here is a recipe for vegan banana bread:", max_tokens=64)["choices"][0]["text"])
```

The file carries the tokenizer and MPT-7B-Chat's ChatML template (`tokenizer.chat_template`)."""


_LIMITATIONS = """## Limitations

A language model with no safety tuning unless its training data provided it: it can produce wrong,
biased or offensive text. Check its output before relying on it."""


def model_card(model, tokenizer, source: ModelSource, export: Export) -> str:
    """The README.md of an export of `model` (as loaded from `source`)."""
    from mptkit.model.modeling_mpt import transformers_mpt_ignores

    chat = bool(getattr(tokenizer, "chat_template", None))
    record = source.training_record()
    usage = (_usage_gguf(export.location, export.gguf_file) if export.kind == "gguf"
             else _usage_hf(export.location, chat, native=not transformers_mpt_ignores(model.config),
                            tokenizer_saved=tokenizer is not None))
    sections = [
        _front_matter(export, chat),
        f"# {record.run_name if record and record.run_name else source.name}",
        _architecture(model, export),
        _training(source, record, export),
        _evaluation(record, export.location),
        usage,
        _LIMITATIONS,
    ]
    return "\n\n".join(sections) + "\n"
