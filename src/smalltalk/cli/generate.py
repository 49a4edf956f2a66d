"""`smalltalk generate MODEL_DIR --prompt TEXT`: print a model's continuation of a prompt."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import SmallTalkError
from ._prompt import read_prompt


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="continue a prompt with a trained model",
                              description="Sample a continuation of --prompt from a model directory "
                                          "(model.safetensors + config.json + tokenizer.json) and print it.")
    p.add_argument("model_dir", type=Path, help="model directory, e.g. runs/dense/model")
    p.add_argument("--prompt", required=True, help="text to continue ('-' reads it from stdin; '' = unconditional)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate at most (default 100)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with probability >= p")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when this text appears (cut before it); repeat for several")
    p.add_argument("--seed", type=int, default=None, help="fix the sampling RNG")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--no-cache", action="store_true", help="recompute the window every step (slow; for checks)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is often fastest for small models)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..model.generate import generate
    from .route import generate_from_bundle, is_bundle_path

    if is_bundle_path(args.model_dir):  # a mixture bundle: route the prompt, then its expert generates
        return generate_from_bundle(args)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise SmallTalkError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if args.threads is not None:
        if args.threads < 1:
            raise SmallTalkError(f"--threads {args.threads}: must be at least 1")
        torch.set_num_threads(args.threads)
    prompt = read_prompt(args.prompt)
    from ..model.io import load_with_tokenizer

    model, tokenizer = load_with_tokenizer(args.model_dir, device)
    start = time.perf_counter()
    result = generate(model, tokenizer, prompt, args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, stop=args.stop, seed=args.seed, greedy=args.greedy,
                      use_cache=not args.no_cache)
    seconds = time.perf_counter() - start
    print(result.text)
    truncated = ", prompt left-truncated to the context" if result.prompt_truncated else ""
    print(f"[{len(result.token_ids)} tokens, finish: {result.finish_reason}, "
          f"{len(result.token_ids) / max(seconds, 1e-9):.1f} tokens/s{truncated}]", file=sys.stderr)
    return 0
