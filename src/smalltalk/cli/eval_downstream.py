"""``smalltalk eval-downstream``: mixture vs dense on downstream tasks through lm-eval (paper App. B)."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval-downstream",
        help="compare a mixture bundle with its dense baseline on BLiMP / HellaSwag / GSM8K via lm-eval",
        description="Run lm-evaluation-harness tasks for a mixture bundle (each request routed by its own "
                    "prefix) and for the dense baseline, and write a side-by-side table with stderr, winners "
                    "and per-expert routing counts (downstream.json + downstream.md).")
    parser.add_argument("--run-dir", help="a `smalltalk run` directory: uses RUN/bundle and RUN/dense/model, "
                                           "writes RUN/eval/downstream.{json,md} and a section of RUN/report.md")
    parser.add_argument("--bundle", help="mixture bundle directory (default: RUN/bundle)")
    parser.add_argument("--dense", help="dense baseline model directory (default: RUN/dense/model)")
    parser.add_argument("--tasks", default="blimp,hellaswag,gsm8k",
                        help="comma-separated tasks: blimp (67 paradigms), blimp_<paradigm>, hellaswag, gsm8k "
                             "(local copies), any lm-eval task name, or a task YAML file of your own "
                             "(default: %(default)s)")
    parser.add_argument("--include-path", default=None, metavar="DIR[:DIR]",
                        help="folders of your own lm-eval task YAMLs (ours are always included)")
    parser.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    parser.add_argument("--out", help="output directory for downstream.json / downstream.md (default: RUN/eval)")
    parser.add_argument("--prefix-len", type=int, default=None,
                        help="routing prefix length M-hat in tokens (default: the bundle's M)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass (default: 32)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    parser.add_argument("--evals", default=None,
                        help="local eval data directory (default: $SMALLTALK_EVALS or ../shared/evals)")
    parser.add_argument("--online", action="store_true",
                        help="use lm-eval's standard blimp/hellaswag/gsm8k tasks (downloads from the Hub)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    parser.add_argument("--max-gen-toks", type=int, default=256,
                        help="generation budget for generate_until tasks (default: 256)")
    parser.add_argument("--empty-context", choices=("sequence", "fallback"), default="sequence",
                        help="route requests with an empty context (BLiMP sentences) by the scored text itself "
                             "(sequence, default) or send them to the bundle's fallback expert")
    parser.add_argument("--seed", type=int, default=1234, help="seed for lm-eval and sampling (default: 1234)")
    parser.add_argument("--fresh", action="store_true",
                        help="evaluate both sides again even when OUT holds a side's results from the same model "
                             "files and settings (default: reuse them, so an interrupted job resumes)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..evaluation.downstream import DownstreamConfig, run_downstream

    from ..errors import SmallTalkError

    if args.out is None and args.run_dir is None:
        raise SmallTalkError("give --out DIR (or --run-dir RUN to write into RUN/eval)")
    cfg = DownstreamConfig(run_dir=args.run_dir, bundle=args.bundle, dense=args.dense, tasks=args.tasks, limit=args.limit, out=args.out,
                           prefix_len=args.prefix_len, batch_size=args.batch_size, device=args.device,
                           evals_dir=args.evals, online=args.online, num_fewshot=args.num_fewshot,
                           max_gen_toks=args.max_gen_toks, empty_context=args.empty_context,
                           seed=args.seed, include_path=args.include_path or [], resume=not args.fresh)
    report = run_downstream(cfg, log=lambda msg: print(msg, file=sys.stderr))
    routing = (report["comparison"].get("routing") or {}).get("requests", {})
    for task, counts in routing.items():
        total = sum(counts.values()) or 1
        shares = ", ".join(f"expert {e}: {n} ({100 * n / total:.0f}%)" for e, n in sorted(counts.items(), key=lambda kv: int(kv[0])))
        print(f"requests routed, {task}: {shares}")
    s = report["comparison"]["summary"]
    if s["tasks"]:
        print(f"mixture better or equal on {s['mixture_better'] + s['ties']}/{s['tasks']} tasks "
              f"({100 * s['better_or_equal_rate']:.0f}%)")
    print(f"wrote {cfg.out}/downstream.md and downstream.json")
    return 0
