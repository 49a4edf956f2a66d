"""``smalltalk route``: which expert of a mixture bundle answers a prompt, and why.

    smalltalk route RUN_DIR/bundle --prompt "def fibonacci(n):"
    smalltalk route RUN_DIR --prompt "Il était une fois" --prefix-len 16 --json

Scores the first M-hat tokens of each prompt (default: the M the routers were trained with) under
every router and picks the argmax (paper Eq. 4-8; an empty prompt goes to the bundle's fallback
expert). Only the routers are loaded, so this works even when an expert's weights are missing;
the expert table says which experts are present (``--verify`` also checks their checksums).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import SmallTalkError
from ._prompt import read_prompt


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("route", help="route prompts to the experts of a mixture bundle",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path, help="mixture bundle directory (or a run directory holding bundle/)")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text ('-' reads stdin); repeat for several prompts")
    p.add_argument("--prefix-len", type=int, help="M-hat: routing prefix tokens (default: the bundle's M)")
    p.add_argument("--verify", action="store_true", help="also verify every expert's weights checksum")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu: routers are small)")
    p.set_defaults(func=run)


def resolve_bundle(path: Path) -> Path:
    """A bundle, or a run directory's bundle (`smalltalk.run.locate`)."""
    from ..run.locate import locate

    return locate(path, want=("bundle",)).bundle


def run(args: argparse.Namespace) -> int:
    from ..mixture.inference import Mixture

    mixture = Mixture.load(resolve_bundle(args.bundle), device=args.device)
    prompts = [read_prompt(p) for p in args.prompt]
    routes = [mixture.route(p, args.prefix_len) for p in prompts]
    status = mixture.status(verify=args.verify)
    if args.json:
        for prompt, route in zip(prompts, routes):
            print(json.dumps({"prompt": prompt, **route.to_dict(),
                              "expert_problem": status[route.expert]["problem"]}))
        return 0
    for prompt, route in zip(prompts, routes):
        shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        how = ("empty prompt: fallback expert (largest training share)" if route.fallback else
               f"{route.num_tokens} of {route.prompt_tokens} prompt tokens")
        print(f"{shown!r} -> expert {route.expert} ({how})")
        if not route.fallback:
            post = route.posterior
            for e, score in enumerate(route.scores):
                mark = "*" if e == route.expert else " "
                print(f"  {mark} expert {e}: log-likelihood {score:9.2f}  posterior {post[e]:.3f}")
        problem = status[route.expert]["problem"]
        if problem:
            print(f"  warning: expert {route.expert} cannot be loaded: {problem}")
    print("experts: " + ", ".join(
        f"{s['expert']} ({100 * (s['train_share'] or 0):.0f}% of training data, "
        f"{'OK' if not s['problem'] else 'PROBLEM: ' + s['problem']})" for s in status))
    if any(s["problem"] for s in status):
        raise SmallTalkError(f"bundle {mixture.info.root}: expert(s) {[s['expert'] for s in status if s['problem']]} "
                             "are missing or corrupt (routing above still works); rebuild the bundle")
    return 0


def is_bundle_path(path: Path) -> bool:
    from ..run.locate import locate

    try:
        return locate(path).bundle is not None
    except SmallTalkError:
        return False


def generate_from_bundle(args: argparse.Namespace) -> int:
    """`smalltalk generate BUNDLE ...`: route the prompt by its prefix, then the chosen expert continues it."""
    import time

    import torch

    from ..mixture.inference import Mixture

    if args.threads is not None:
        if args.threads < 1:
            raise SmallTalkError(f"--threads {args.threads}: must be at least 1")
        torch.set_num_threads(args.threads)
    mixture = Mixture.load(resolve_bundle(args.model_dir), device=args.device)
    prompt = read_prompt(args.prompt)
    start = time.perf_counter()
    out = mixture.generate(prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, stop=args.stop, seed=args.seed, greedy=args.greedy,
                           use_cache=not args.no_cache)
    seconds = time.perf_counter() - start
    print(out.result.text)
    route = out.route
    how = "empty prompt: fallback expert" if route.fallback else f"routed on {route.num_tokens} prompt tokens"
    truncated = ", prompt left-truncated to the context" if out.result.prompt_truncated else ""
    print(f"[expert {route.expert} ({how}); {len(out.result.token_ids)} tokens, finish: {out.result.finish_reason}, "
          f"{len(out.result.token_ids) / max(seconds, 1e-9):.1f} tokens/s{truncated}]", file=sys.stderr)
    return 0
