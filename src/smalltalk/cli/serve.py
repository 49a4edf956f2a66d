"""``smalltalk serve BUNDLE_OR_MODEL_DIR``: an OpenAI-compatible HTTP server for a mixture or one model.

    smalltalk serve runs/quickstart/bundle                        # http://127.0.0.1:8000/v1
    smalltalk serve runs/quickstart/dense/model --port 8001       # one model (e.g. another server's expert)
    smalltalk serve runs/x/bundle --expert-url 0=http://gpu-a:8001/v1 --expert-url 1=http://gpu-b:8001/v1

Every request is routed by its own prompt prefix to one expert (paper Eq. 4-8); the response names
the expert (``smalltalk.routes``, header ``X-Smalltalk-Expert``). Experts given by --expert-url (or a
serving YAML's ``experts:``) are answered by that server - vLLM serving the expert's Hugging Face
export, or another ``smalltalk serve`` - and the front-end only routes and forwards. See docs/serving.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import SmallTalkError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a mixture bundle or a model over an OpenAI-compatible HTTP API",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="mixture bundle (or run directory holding bundle/), or a model directory")
    p.add_argument("--config", type=Path, help="serving YAML (fields of smalltalk.serving.ServeConfig, experts:)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--prefix-len", type=int, help="M-hat: routing prefix tokens (default: the bundle's M)")
    p.add_argument("--max-loaded-experts", type=int,
                   help="local experts kept in memory, least recently used evicted (default: all)")
    p.add_argument("--device", help="cpu, cuda or auto (default auto)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $SMALLTALK_API_KEY, else open)")
    p.add_argument("--expert-url", action="append", default=[], metavar="K=URL",
                   help="expert K is answered by the OpenAI-compatible server at URL (…/v1); repeat per expert")
    p.add_argument("--no-batching", action="store_true", help="route and decode one request at a time")
    p.add_argument("--batch-window-ms", type=float, help="wait this long for requests to batch with (default 5)")
    p.add_argument("--max-batch-size", type=int, help="requests decoded together at most (default 32)")
    p.add_argument("--long-prompt", choices=["error", "truncate"],
                   help="a prompt longer than the context: refuse with 400 (default) or keep its last tokens")
    p.add_argument("--expert-timeout", type=float, help="seconds before a remote expert counts as down (default 120)")
    p.add_argument("--served-model-name", help="model id in /v1/models (default: the run or directory name)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    p.set_defaults(func=run)


def build_config(args):
    """The ServeConfig of the command line (a serving YAML, then flags over it)."""
    from ..serving.config import ServeConfig, load_serve_yaml, parse_expert_url

    values = load_serve_yaml(args.config) if args.config else {}
    flags = {"host": args.host, "port": args.port, "prefix_len": args.prefix_len,
             "max_loaded_experts": args.max_loaded_experts, "device": args.device, "api_key": args.api_key,
             "batch_window_ms": args.batch_window_ms, "max_batch_size": args.max_batch_size,
             "long_prompt": args.long_prompt, "expert_timeout_s": args.expert_timeout,
             "served_model_name": args.served_model_name, "threads": args.threads}
    values.update({k: v for k, v in flags.items() if v is not None})
    if args.no_batching:
        values["batching"] = False
    experts = dict(values.pop("experts", None) or {})
    for spec in args.expert_url:
        x = parse_expert_url(spec)
        experts[x.index] = x
    if args.threads is not None and args.threads < 1:
        raise SmallTalkError(f"--threads {args.threads}: must be at least 1")
    try:
        return ServeConfig(path=args.path, experts=experts, **values)
    except TypeError as e:
        raise SmallTalkError(f"serving config: {e}") from None


def run(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as e:
        raise SmallTalkError(f"smalltalk serve needs {e.name}: pip install 'smalltalk[serve]'") from None
    from ..serving import serve

    cfg = build_config(args)
    if not cfg.path.exists():
        raise SmallTalkError(f"{cfg.path}: no such bundle or model directory")
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    return serve(cfg, log_level=args.log_level)
