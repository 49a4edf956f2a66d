"""`smalltalk flops`: the paper's FLOP counts (App. A.3) for any configuration, or Table 3."""

from __future__ import annotations

import argparse
import json

from ..errors import SmallTalkError
from ..model import flops
from ..model.config import PRESETS, ModelConfig, preset


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("flops", help="training/inference FLOPs of a model or mixture (paper App. A.3, Table 3)",
                       description="Evaluate the paper's Eq. 10-16. Without --experts: one dense model. With "
                                   "--experts E: the mixture (routers training + sharding, experts) vs a dense "
                                   "model trained on the same tokens.")
    p.add_argument("--paper-table3", action="store_true", help="print the paper's Table 3 recomputed from Tables 1-2")
    p.add_argument("--preset", default="expert-335m", choices=sorted(PRESETS),
                   help="model (or expert) preset (default: %(default)s)")
    p.add_argument("--hidden", type=int, help="override hidden size H")
    p.add_argument("--layers", type=int, help="override number of layers L")
    p.add_argument("--heads", type=int, help="override attention heads (does not change FLOPs)")
    p.add_argument("--ffn-mult", type=int, help="override feed-forward expansion (D_ff = ffn_mult * H)")
    p.add_argument("--vocab-size", type=int, help="override vocabulary V (models and routers)")
    p.add_argument("--seq-len", type=int, help="sequence length S (default: the preset's context)")
    p.add_argument("--batch-size", type=int, default=128,
                   help="sequences per step (per expert with --experts) (default: %(default)s)")
    p.add_argument("--steps", type=int, default=1, help="training steps (per expert with --experts) (default: 1)")
    p.add_argument("--experts", type=int, help="number of experts E: cost the mixture (Eq. 12-16)")
    p.add_argument("--router-preset", default="router-4.4m", choices=sorted(PRESETS),
                   help="router preset for --experts (default: %(default)s)")
    p.add_argument("--router-hidden", type=int, help="override router hidden size H_r")
    p.add_argument("--router-layers", type=int, help="override router layers L_r")
    p.add_argument("--router-steps", type=int, default=128_000, help="router training steps (default: %(default)s)")
    p.add_argument("--router-batch-size", type=int, default=32, help="router batch size B_r (default: %(default)s)")
    p.add_argument("--prefix-len", type=int, default=256, help="routing prefix length M (default: %(default)s)")
    p.add_argument("--dense-steps", type=int, help="dense baseline steps (default: --steps)")
    p.add_argument("--dense-batch-size", type=int,
                   help="dense baseline batch (default: E * --batch-size, i.e. the same tokens as the mixture)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def _model(name: str, args: argparse.Namespace, hidden: int | None, layers: int | None,
           heads: int | None, ffn_mult: int | None) -> ModelConfig:
    overrides = {k: v for k, v in (("hidden_size", hidden), ("num_layers", layers), ("num_heads", heads),
                                   ("ffn_mult", ffn_mult), ("vocab_size", args.vocab_size)) if v is not None}
    if hidden is not None and heads is None:
        # Keep the preset's head size when only the width changes, so the config stays valid.
        head_dim = PRESETS[name].head_dim
        overrides["num_heads"] = max(1, hidden // head_dim) if hidden % head_dim == 0 else 1
    if args.seq_len is not None:
        overrides["max_seq_len"] = max(args.seq_len, PRESETS[name].max_seq_len)
    return preset(name, **overrides)


def _fmt(x: float) -> str:
    return f"{x:.4e}"


def run(args: argparse.Namespace) -> int:
    if args.paper_table3:
        rows = flops.paper_table3()
        if args.json:
            print(json.dumps([{k: v for k, v in r.__dict__.items() if k != "flops"} | {"flops": r.flops.to_dict()}
                              for r in rows], indent=1))
        else:
            print("Table 3 (paper App. A.3) recomputed with Eq. 10-16; % as the paper: ratio of printed values.")
            print(flops.format_table3(rows))
        return 0

    cfg = _model(args.preset, args, args.hidden, args.layers, args.heads, args.ffn_mult)
    seq_len = cfg.max_seq_len if args.seq_len is None else args.seq_len
    if args.experts is None:
        result = {
            "model": cfg.to_dict() | {"num_params": cfg.num_params()},
            "seq_len": seq_len, "batch_size": args.batch_size, "steps": args.steps,
            "forward_flops_per_step": flops.forward_flops(cfg, args.batch_size, seq_len),
            "training_flops_per_step": flops.training_flops_per_step(cfg, args.batch_size, seq_len),
            "training_flops": flops.training_flops(cfg, args.steps, args.batch_size, seq_len),
            "inference_flops_per_sequence": flops.inference_flops(cfg, seq_len),
        }
        if args.json:
            print(json.dumps(result, indent=1))
        else:
            print(cfg.describe())
            print(f"S={seq_len} B={args.batch_size} steps={args.steps}")
            print(f"forward FLOPs / step      {_fmt(result['forward_flops_per_step'])}")
            print(f"training FLOPs / step     {_fmt(result['training_flops_per_step'])}   (3 x forward)")
            print(f"training FLOPs (Eq. 10)   {_fmt(result['training_flops'])}")
            print(f"inference FLOPs / seq     {_fmt(result['inference_flops_per_sequence'])}   (Eq. 11, B=1)")
        return 0

    if args.experts <= 0:
        raise SmallTalkError(f"--experts={args.experts} must be a positive integer")
    router_cfg = _model(args.router_preset, args, args.router_hidden, args.router_layers, None, None)
    mix = flops.mixture_flops(cfg, router_cfg, args.experts, seq_len=seq_len, prefix_len=args.prefix_len,
                              expert_steps=args.steps, expert_batch_size=args.batch_size,
                              router_steps=args.router_steps, router_batch_size=args.router_batch_size,
                              dense_steps=args.dense_steps, dense_batch_size=args.dense_batch_size)
    d = mix.to_dict()
    if args.json:
        print(json.dumps({"expert": cfg.to_dict(), "router": router_cfg.to_dict(), "seq_len": seq_len,
                          "prefix_len": args.prefix_len} | d, indent=1))
        return 0
    print(f"experts: {cfg.describe()}")
    print(f"routers: {router_cfg.describe()}")
    print(f"E={args.experts} S={seq_len} M={args.prefix_len} expert {args.steps} steps x B={args.batch_size}, "
          f"router {args.router_steps} steps x B_r={args.router_batch_size}")
    print("training FLOPs")
    for key, label in (("routers_training", "routers training (Eq. 13)"),
                       ("routers_sharding", "sharding for routers (Eq. 14)"),
                       ("experts_training", "experts training (Eq. 15)"),
                       ("experts_sharding", "sharding for experts (Eq. 16)"),
                       ("total_training", "mixture total (Eq. 12)"),
                       ("dense_training", "dense baseline (Eq. 10)")):
        print(f"  {label:<32}{_fmt(d[key])}")
    print(f"  routing overhead                {_fmt(d['training_overhead'])}  "
          f"({d['training_overhead_pct']:.2f}% of dense)")
    print("inference FLOPs per sequence")
    print(f"  expert (Eq. 11)                 {_fmt(d['expert_inference'])}")
    label = f"{args.experts} routers on M={args.prefix_len} prefix"
    print(f"  {label:<32}{_fmt(d['routers_inference'])}  "
          f"({d['inference_overhead_pct']:.2f}% of dense)")
    print(f"  dense (Eq. 11)                  {_fmt(d['dense_inference'])}")
    return 0
