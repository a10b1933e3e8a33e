"""The OpenAI request bodies we accept, validated strictly, and the error body we answer with.

Types are strict (a string is not an integer, a bool is not a number) and unknown fields are
refused, as the OpenAI API does: a client typo should not silently change the request.
Accepted beyond OpenAI's fields: `top_k` and `repetition_penalty` (as vLLM does).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Number = StrictInt | StrictFloat


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class _SamplingFields(_Strict):
    model: StrictStr
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=0)] | None = None
    repetition_penalty: Annotated[Number, Field(gt=0, le=10)] | None = None
    n: Literal[1] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    seed: StrictInt | None = None
    user: StrictStr | None = None
    # accepted for compatibility only at their neutral values
    presence_penalty: Annotated[Number, Field(ge=0, le=0)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=0, le=0)] | None = None
    logit_bias: Annotated[dict[str, Number], Field(max_length=0)] | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return tuple(s for s in stops if s)


class CompletionRequest(_SamplingFields):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = 16  # OpenAI's default for completions
    echo: Literal[False] | None = None
    logprobs: None = None
    best_of: Literal[1] | None = None
    suffix: None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None  # default: the rest of the context
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None  # the newer name
    logprobs: Literal[False] | None = None
    top_logprobs: None = None


def error_body(message: str, param: str | None = None, code: str | None = None,
               type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class RequestError(Exception):
    """An invalid request: answered with HTTP `status` and an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status

    def body(self) -> dict:
        return error_body(self.message, self.param, self.code)


def validation_message(error) -> tuple[str, str | None]:
    """(message, param) for the first problem of a pydantic ValidationError."""
    first = error.errors(include_url=False)[0]
    location = [str(part) for part in first.get("loc", ())]
    # pydantic names union members in the location (e.g. "str", "list[int]"): keep field names only
    param = ".".join(p for p in location if not any(ch in p for ch in "[]") and p not in ("str", "int", "float"))
    if first.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param or None
    if first.get("type") == "missing":
        return f"Missing required parameter: '{param}'.", param or None
    return f"Invalid value for '{param}': {first.get('msg')}.", param or None
