"""Prompts for generation: the MPT-7B templates applied to a user's text, the stop tokens that go
with each template, and ChatML history trimmed to fit the context window."""

from __future__ import annotations

from mptkit.data.templates import IM_END, format_chatml, format_instruct

# none: the text as given; instruct: the mpt-7b-instruct template; chat: ChatML (mpt-7b-chat).
TEMPLATES = ("none", "instruct", "chat")
DEFAULT_TEMPLATE = "auto"  # template_for(the model's name)


def template_for(model: str) -> str:
    """The template a model's name (hub name or directory) implies: mosaicml/mpt-7b-instruct ->
    instruct, mpt-7b-chat -> chat, anything else (mpt-7b, storywriter, a pretrained run) -> none."""
    name = model.rstrip("/").rsplit("/", 1)[-1].split("@")[0].lower()
    return next((template for template in ("instruct", "chat") if template in name), "none")


def apply_template(template: str, prompt: str, system: str | None = None) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"template {template!r}: expected one of {', '.join(TEMPLATES)}")
    if template == "instruct":
        return format_instruct(prompt)
    if template == "chat":
        messages = [{"role": "system", "content": system}] if system else []
        return format_chatml(messages + [{"role": "user", "content": prompt}], add_generation_prompt=True)
    return prompt


def stop_token_ids(tokenizer, template: str) -> frozenset[int]:
    """eos always; ChatML's `<|im_end|>` too when the prompt is ChatML."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if template == "chat":
        im_end = tokenizer.convert_tokens_to_ids(IM_END)
        if im_end is not None and im_end != tokenizer.unk_token_id:
            ids.add(im_end)
    return frozenset(ids)


def chat_prompt_ids(tokenizer, system: str, history: list[dict], message: str, budget: int) -> list[int] | None:
    """Token ids of the ChatML prompt for `message`, with the oldest turns of `history` dropped
    until it fits in `budget` tokens; None when even the message alone (and the system turn) does not.
    `history` is trimmed in place, one user/assistant exchange at a time."""
    system_turn = [{"role": "system", "content": system}] if system else []
    while True:
        messages = system_turn + history + [{"role": "user", "content": message}]
        ids = tokenizer(format_chatml(messages, add_generation_prompt=True))["input_ids"]
        if len(ids) <= budget:
            return ids
        if not history:
            return None
        del history[:2]  # the oldest user turn and the assistant's answer to it
