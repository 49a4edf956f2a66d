"""What `smalltalk serve` serves and how: `ServeConfig`, from CLI flags or a YAML file.

A serving YAML (``smalltalk serve BUNDLE --config serve.yaml``) holds any field of `ServeConfig`,
plus ``experts``, the remote experts::

    host: 127.0.0.1
    port: 8000
    api_key: secret            # or the SMALLTALK_API_KEY environment variable
    experts:                   # expert index -> an OpenAI-compatible server of that expert
      0: {url: "http://gpu-a:8001/v1", model: "expert-0"}
      1: {url: "http://gpu-b:8001/v1"}          # model: the first one its /v1/models lists

Experts not listed there run in the front-end's own process.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config_dict import check_known_keys
from ..errors import SmallTalkError

LONG_PROMPT_RULES = ("error", "truncate")


@dataclass
class RemoteExpert:
    """Expert `index` answered by an OpenAI-compatible server (vLLM, or another `smalltalk serve`)."""

    index: int
    url: str
    """Base URL of the API, ending in /v1 (requests go to URL/completions)."""
    model: str | None = None
    """Model name on that server; None: the first one its URL/models lists."""
    api_key: str | None = None
    """Bearer token for that server, if it wants one."""

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            raise SmallTalkError(f"remote expert {self.index}: url={self.url!r} must start with http:// or https://")
        self.url = self.url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"


@dataclass
class ServeConfig:
    path: Path
    """A mixture bundle (or a run directory holding bundle/), or one model directory."""
    host: str = "127.0.0.1"
    port: int = 8000
    prefix_len: int | None = None
    """M-hat, routing prefix tokens (default: the bundle's M)."""
    max_loaded_experts: int | None = None
    """Local experts kept in memory, least recently used evicted (None: all of them; loading an expert from disk
    costs far more than a request, so lower this only for bundles that do not fit in memory)."""
    device: str = "auto"
    api_key: str | None = None
    """Bearer token required on every endpoint except /health (None: open)."""
    experts: dict[int, RemoteExpert] = field(default_factory=dict)
    """Remote experts by index; the others run locally."""
    batching: bool = True
    """Route concurrent requests together and decode same-expert requests as one batch."""
    batch_window_ms: float = 5.0
    """How long the first request of a batch waits for company."""
    max_batch_size: int = 32
    """Requests decoded together at most."""
    long_prompt: str = "error"
    """A prompt longer than the context: "error" (400) or "truncate" (keep its last tokens)."""
    max_body_bytes: int = 8 << 20
    """Larger request bodies are refused with 413."""
    expert_timeout_s: float = 120.0
    """A remote expert that does not answer within this is reported as unavailable (503)."""
    served_model_name: str | None = None
    """Model id in /v1/models (default: the bundle's or model's directory name)."""
    threads: int | None = None
    """torch CPU threads (None: torch's choice)."""

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        for key in ("port", "max_loaded_experts", "max_batch_size", "max_body_bytes"):
            value = getattr(self, key)
            if key == "max_loaded_experts" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "port" else 1):
                raise SmallTalkError(f"serve config: {key}={value!r} must be a positive integer")
        if self.long_prompt not in LONG_PROMPT_RULES:
            raise SmallTalkError(f"serve config: long_prompt={self.long_prompt!r}; choose one of "
                                 f"{', '.join(LONG_PROMPT_RULES)}")
        if not self.batch_window_ms >= 0:
            raise SmallTalkError(f"serve config: batch_window_ms={self.batch_window_ms!r} must be >= 0")
        if not self.expert_timeout_s > 0:
            raise SmallTalkError(f"serve config: expert_timeout_s={self.expert_timeout_s!r} must be > 0")
        experts = [v if isinstance(v, RemoteExpert) else _remote(k, v) for k, v in self.experts.items()]
        self.experts = {x.index: x for x in experts}
        if self.api_key is None:
            self.api_key = os.environ.get("SMALLTALK_API_KEY") or None


def _remote(index: Any, value: Any) -> RemoteExpert:
    try:
        index = int(index)
    except (TypeError, ValueError):
        raise SmallTalkError(f"serve config: experts key {index!r} must be an expert index") from None
    if isinstance(value, str):
        value = {"url": value}
    if not isinstance(value, dict):
        raise SmallTalkError(f"serve config: experts.{index} must be a URL or a mapping {{url, model, api_key}}")
    check_known_keys(RemoteExpert, {k: v for k, v in value.items() if k != "index"}, f"serve config: experts.{index}")
    return RemoteExpert(index=index, **{k: v for k, v in value.items() if k != "index"})


def parse_expert_url(spec: str) -> RemoteExpert:
    """``K=URL`` (``--expert-url``) -> RemoteExpert."""
    index, sep, url = spec.partition("=")
    if not sep or not index.strip().isdigit():
        raise SmallTalkError(f"--expert-url {spec!r}: write K=URL, e.g. 0=http://127.0.0.1:8001/v1")
    return RemoteExpert(index=int(index), url=url.strip())


def load_serve_yaml(path: str | Path) -> dict:
    """The mapping of a serving YAML file (validated when `ServeConfig` is built from it)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SmallTalkError(f"--config {path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise SmallTalkError(f"{path}: cannot parse the serving config ({type(e).__name__})") from None
    if not isinstance(raw, dict):
        raise SmallTalkError(f"{path}: a serving config must be a mapping (host, port, experts, ...)")
    known = {f.name for f in dataclasses.fields(ServeConfig)} - {"path"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SmallTalkError(f"{path}: unknown key(s) {unknown}; known: {', '.join(sorted(known))}")
    return raw
