"""The OpenAI request shapes the server accepts, their validation, and the OpenAI-style error.

Requests are pydantic models; extra fields (``user``, ``presence_penalty``, ...) are accepted and
ignored, so the official clients work unchanged. Every refusal is an `APIError`, sent as OpenAI's
``{"error": {"message", "type", "param", "code"}}`` with its HTTP status.

Chat template. The experts are base LMs, so chat messages are rendered as plain text, one line per
message, and the model continues after ``Assistant:``::

    System: You are terse.
    User: Name a prime.
    Assistant:

Generation stops at a new ``User:`` or ``System:`` line (added to the request's own stop strings).
Routing reads the rendered prompt's prefix, like any completion.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

MAX_LOGPROBS = 20
MAX_STOP = 4
MAX_N = 8
"""Most choices per prompt (`n`); each samples with its own generator (seed + its index)."""
CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = ("\nUser:", "\nSystem:")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code if self.code is not None else self.status}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = 1

    def stops(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP:
            raise APIError(400, f"stop: at most {MAX_STOP} stop strings, got {len(stop)}", param="stop")
        return [s for s in stop if s]

    def check(self, context: int, allow_zero_tokens: bool = False) -> int:
        """Validate the sampling fields; the token budget (max_tokens, default 16)."""
        if isinstance(self.n, bool) or not 1 <= self.n <= MAX_N:
            raise APIError(400, f"n={self.n}: must be between 1 and {MAX_N} (choices per prompt)", param="n")
        if not self.temperature >= 0:
            raise APIError(400, f"temperature={self.temperature}: must be >= 0 (0 is greedy)", param="temperature")
        if not 0 < self.top_p <= 1:
            raise APIError(400, f"top_p={self.top_p}: must be in (0, 1]", param="top_p")
        budget = 16 if self.max_tokens is None else self.max_tokens
        low = 0 if allow_zero_tokens else 1
        if budget < low:
            hint = " (0 only with echo=true, to score the prompt)" if not allow_zero_tokens else ""
            raise APIError(400, f"max_tokens={budget}: must be >= {low}{hint}", param="max_tokens")
        if budget > context:
            raise APIError(400, f"max_tokens={budget} is past the context of {context} tokens; ask for at most "
                                f"{context}", param="max_tokens")
        if self.seed is not None and self.seed < 0:
            raise APIError(400, f"seed={self.seed}: must be >= 0", param="seed")
        return budget


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    echo: bool = False
    logprobs: int | None = None
    ignore_eos: bool = False
    """vLLM's extra: keep generating past EOS (benchmarks that want exactly max_tokens)."""

    def prompts(self) -> list[str | list[int]]:
        if self.prompt is None:
            raise APIError(400, "prompt is required (a string, a list of strings, or token ids)", param="prompt")
        if isinstance(self.prompt, str):
            return [self.prompt]
        if not self.prompt:
            raise APIError(400, "prompt is an empty list; give at least one prompt", param="prompt")
        if all(isinstance(t, int) for t in self.prompt):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]

    def check_logprobs(self) -> int | None:
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs={self.logprobs}: must be in [0, {MAX_LOGPROBS}]", param="logprobs")
        return self.logprobs


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[dict]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class ChatRequest(_Request):
    messages: list[ChatMessage] | None = None
    logprobs: bool | None = None

    def render(self) -> str:
        if not self.messages:
            raise APIError(400, "messages is required: a non-empty list of {role, content}", param="messages")
        if self.logprobs:
            raise APIError(400, "logprobs are not supported on /v1/chat/completions; use /v1/completions with "
                                "logprobs", param="logprobs")
        lines = [f"{CHAT_ROLES[m.role]}: {m.text()}" for m in self.messages]
        return "\n".join(lines) + "\nAssistant:"


def parse(model: type[BaseModel], body: object):
    """Validate a JSON body; the first problem as a 400 naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"] if not isinstance(p, int) or len(err["loc"]) == 1)
        value = err.get("input")
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise APIError(400, f"{field}={shown}: {err['msg']}", param=field or None) from None
