"""Request bodies of the OpenAI-compatible endpoints (the subset this server implements) and of the adapter
endpoints. Parameters the server does not implement are refused by name rather than silently ignored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# parameter -> the values that mean "not used" (a client may always send these)
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "echo": (None, False),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "tools": (None, []),
    "functions": (None, []),
}


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, description="an adapter name, or the base model's name")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch.Generator.manual_seed takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, neutral in UNSUPPORTED.items():
                if key in data and data[key] not in neutral:
                    raise ValueError(f"`{key}` is not supported by this server; leave it out (or send {neutral[-1]!r})")
        return data

    @model_validator(mode="after")
    def _check_stop(self) -> _Request:
        stops = self.stop_strings()
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("`stop` takes up to 4 non-empty strings")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] = Field(description="text, several texts, or token ids")
    max_tokens: int | None = Field(16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: str | list[str] | list[int]) -> str | list[str] | list[int]:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("`prompt` is an empty list; send a string, a list of strings, or token ids")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        """One entry per completion to generate: a text, or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [[int(p) for p in self.prompt]]
        return [str(p) for p in self.prompt]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = Field(min_length=1)
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="the name clients will pass as `model`")
    path: str = Field(min_length=1, description="the adapter directory, relative to the server's --adapter-root")


_Request.model_rebuild()
