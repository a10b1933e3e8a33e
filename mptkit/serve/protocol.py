"""The OpenAI request bodies we accept, validated strictly, and the error body we answer with.

Types are strict (a string is not an integer, a bool is not a number) and unknown fields are
refused, as the OpenAI API does: a client typo should not silently change the request.
Accepted beyond OpenAI's fields: `top_k` and `repetition_penalty` (as vLLM does).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

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
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    seed: StrictInt | None = None
    user: StrictStr | None = None
    # OpenAI fields this server accepts only at their neutral values (see `unsupported`)
    n: StrictInt | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None

    # field -> the values that mean "off"; anything else is refused with a clear 400
    NEUTRAL_VALUES: ClassVar[dict] = {
        "n": (None, 1), "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
    }

    def unsupported(self) -> str | None:
        """The first field set to a value this server does not implement, if any."""
        for name, neutral in self.NEUTRAL_VALUES.items():
            if getattr(self, name) not in neutral:
                return name
        return None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return tuple(s for s in stops if s)


class CompletionRequest(_SamplingFields):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = 16  # OpenAI's default for completions
    echo: StrictBool | None = None
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    NEUTRAL_VALUES: ClassVar[dict] = {
        **_SamplingFields.NEUTRAL_VALUES, "echo": (None, False), "logprobs": (None,), "best_of": (None, 1),
        "suffix": (None, ""),
    }


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
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None

    NEUTRAL_VALUES: ClassVar[dict] = {**_SamplingFields.NEUTRAL_VALUES, "logprobs": (None, False), "top_logprobs": (None,)}


def error_body(message: str, param: str | None = None, code: str | None = None,
               type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class RequestError(Exception):
    """A request we do not serve: answered with HTTP `status`, an OpenAI-style error body of
    `type_` and any `headers` (e.g. Retry-After)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status
        self.type, self.headers = type_, headers

    def body(self) -> dict:
        return error_body(self.message, self.param, self.code, self.type)


def _is_union_tag(part) -> bool:
    """pydantic names the member of a union it tried in the error location ("str", "list[int]")."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def validation_message(error) -> tuple[str, str | None]:
    """(message, param) for the first problem of a pydantic ValidationError; for a union, what
    each accepted form objected to."""
    errors = error.errors(include_url=False)

    def param_of(entry) -> str:
        location = []
        for part in entry.get("loc", ()):
            if _is_union_tag(part):
                break
            location.append(str(part))
        return ".".join(location)

    first = errors[0]
    param = param_of(first)
    if first.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param or None
    if first.get("type") == "missing":
        return f"Missing required parameter: '{param}'.", param or None
    reasons = list(dict.fromkeys(e["msg"] for e in errors if param_of(e) == param))
    return f"Invalid value for '{param}': {'; or '.join(reasons[:3])}.", param or None
