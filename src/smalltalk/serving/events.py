"""What the engine tells a request's handler, in order: `Routed`, then `Remote` (a remote expert answers;
the handler forwards the request) or [`PromptLogprobs`] `Token`* `Done`; or `Failed` at any point.

`Token` events go only to streaming requests and to requests that asked for logprobs; the others get
their whole text with `Done`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..mixture.inference import Route

LogprobEntry = tuple  # (token text, logprob, {token text: logprob} of the top alternatives)


@dataclass(frozen=True)
class Routed:
    route: Route


@dataclass(frozen=True)
class Remote:
    """The routed expert is served elsewhere (`--expert-url`)."""


@dataclass(frozen=True)
class PromptLogprobs:
    entries: list[LogprobEntry]
    """One per prompt token (echo)."""


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    """Text this token completes (may be "" inside a UTF-8 character or while a stop string may start)."""
    logprob: LogprobEntry | None


@dataclass(frozen=True)
class Done:
    finish_reason: str
    """"stop" (EOS or a stop string) or "length"."""
    text: str
    """Text not sent by Token events (all of it for a request that got none)."""
    completion_tokens: int
    """Tokens not counted by Token events."""


@dataclass(frozen=True)
class Failed:
    status: int
    message: str


Event = Routed | Remote | PromptLogprobs | Token | Done | Failed
