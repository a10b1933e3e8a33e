"""Prompt formats of the MPT-7B family, as plain strings (no heavy imports).

Inference builds generation prompts from these, and fine-tuning data is rendered with them, so
the two can never drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# mpt-7b-instruct (dolly-style).
INSTRUCT_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
# Dolly's own key for the optional context passage, placed inside the instruction slot.
INSTRUCT_CONTEXT_KEY = "Input:"

# mpt-7b-chat (ChatML).
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
CHATML_ROLES = ("system", "user", "assistant")
CHATML_GENERATION_PROMPT = f"{IM_START}assistant\n"
DEFAULT_SYSTEM_PROMPT = (
    "A conversation between a user and an LLM-based AI assistant. "
    "The assistant gives helpful and honest answers."
)


def format_instruct(instruction: str, context: str | None = None) -> str:
    """The instruct prompt, ending in "### Response:\\n" where the response begins.

    A non-empty `context` (dolly's field) follows the instruction under an "Input:" key, as in
    Databricks' Dolly prompts.
    """
    if context and context.strip():
        instruction = f"{instruction}\n\n{INSTRUCT_CONTEXT_KEY}\n{context}"
    return INSTRUCT_TEMPLATE.format(instruction=instruction)


# The same ChatML (mpt-7b-chat's format) as a Jinja chat template, set as `tokenizer.chat_template`
# by load_tokenizer, so `apply_chat_template` (transformers, and tools built on it such as vLLM's
# chat endpoint) renders mptkit's prompts. It must render exactly what `format_chatml` renders: one
# `<|im_start|>{role}\n{content}<|im_end|>\n` per message, no default system turn, and
# CHATML_GENERATION_PROMPT with add_generation_prompt (tests/test_data_tokenizer.py checks both).
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def format_chatml_turn(role: str, content: str) -> str:
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def format_chatml(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
    """ChatML text of `messages` ({"role", "content"} mappings), optionally followed by the
    assistant generation prompt."""
    text = "".join(format_chatml_turn(m["role"], m["content"]) for m in messages)
    return text + CHATML_GENERATION_PROMPT if add_generation_prompt else text
