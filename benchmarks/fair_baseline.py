"""The best dense model and the best mixture at equal training FLOPs (issue: mixture vs the best dense model).

Both sides get the same tuning effort on one run's data, routers and shards. Every point sees the same
training tokens as the paper-protocol run, so every point costs the same training FLOPs:

* dense: (batch, steps) from E x the experts' batch at their steps down to the experts' batch at E x their
  steps, and on down to a quarter of it (the batches the experts get), at several peak learning rates;
* experts: their batch, halved and quartered, with the steps to match, at the same learning rates.

Warm-up, validation and checkpoint cadence scale with the steps (the same fraction of training). Every point
is selected on the validation split: the dense model on `valid_seqs` evenly spaced valid sequences, the
mixture on the same sequences, each scored by the expert the routers send it to. The best point of each side
is then evaluated on the test split by the pipeline itself (bundle -> evaluate -> report), next to the
paper-protocol pair (the committed headline's baseline).

Each point is an ordinary run directory under OUT (links to the base run's data, routers and shards; its own
``run_config.json``), trained by the pipeline's own stage functions, so an interrupted sweep resumes where it
stopped when re-run with the same arguments:

    smalltalk run --config cpu --out runs/cpu --until shard
    python benchmarks/fair_baseline.py --base-run runs/cpu --out runs/cpu-fair --threads 2

Writes benchmarks/results/fair_baseline[_NAME].{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from _results import run_main, write_results
from smalltalk.errors import SmallTalkError
from smalltalk.io import atomic_write_json, read_json
from smalltalk.run.config import DenseSettings, RunConfig
from smalltalk.run.dense import train_dense
from smalltalk.run.experts import train_expert, valid_routes
from smalltalk.run.layout import RunLayout, read_run_config
from smalltalk.run.pipeline import check_run_config, run_pipeline

RESULTS = Path(__file__).resolve().parent / "results"
SHARED = ("data", "routers", "shards")


@dataclasses.dataclass(frozen=True)
class Point:
    side: str  # "dense" or "mixture"
    batch_size: int
    max_steps: int
    lr: float

    @property
    def name(self) -> str:
        return f"{self.side}_b{self.batch_size}_lr{self.lr:g}"


def grid(base: RunConfig, dense_batches: list[int], expert_batches: list[int], lrs: list[float]) -> list[Point]:
    t, E = base.expert_train, base.num_experts
    total = E * t.batch_size * t.max_steps
    for batch in expert_batches:
        if (t.batch_size * t.max_steps) % batch:
            raise SmallTalkError(f"--expert-batches {batch}: does not divide {t.batch_size} x {t.max_steps} sequences")
    for batch in dense_batches:
        if total % batch:
            raise SmallTalkError(f"--dense-batches {batch}: does not divide {total} training sequences")
    # The first learning rate at every batch first, so an interrupted sweep has compared the batches.
    points = []
    for lr in lrs:
        points += [Point("mixture", batch, t.batch_size * t.max_steps // batch, lr) for batch in expert_batches]
        points += [Point("dense", batch, total // batch, lr) for batch in dense_batches]
    return points


def point_config(base: RunConfig, mixture: Point | None, dense: Point | None, name: str) -> RunConfig:
    """The base run's config with `mixture`'s expert training and `dense`'s dense training (None: the base's)."""
    d = base.to_dict()
    d["name"] = name
    if mixture is not None:
        d["expert_train"] = base.expert_train.rescaled(mixture.max_steps, batch_size=mixture.batch_size,
                                                        lr=mixture.lr).to_dict()
    if dense is not None:
        d["dense"] = DenseSettings(batch_size=dense.batch_size, lr=dense.lr).to_dict()
    cfg = RunConfig.from_dict(d)
    # The dense side must cost what the base run's experts cost, whatever the experts of this config do.
    assert cfg.dense_train().batch_size * cfg.dense_train().max_steps == \
        base.num_experts * base.expert_train.batch_size * base.expert_train.max_steps
    return cfg


def link_base(base_run: Path, run: Path, with_routes: bool) -> None:
    run.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        link = run / name
        if not link.exists():
            link.symlink_to((base_run / name).resolve())
    routes = RunLayout(run).valid_routes
    if with_routes and not routes.exists():
        routes.parent.mkdir(parents=True, exist_ok=True)
        routes.symlink_to(RunLayout(base_run).valid_routes.resolve())


def train_point(base_run: Path, out: Path, base: RunConfig, p: Point, log) -> Path:
    run = out / p.name
    link_base(base_run, run, with_routes=p.side == "mixture")
    cfg = point_config(base, p if p.side == "mixture" else None, p if p.side == "dense" else None, p.name)
    layout = RunLayout(run)
    check_run_config(layout, cfg)
    if p.side == "mixture":
        for k in range(cfg.num_experts):
            train_expert(run, k, cfg=cfg, progress=False, log=log)
    else:
        train_dense(run, cfg=cfg, progress=False, log=log)
    return run


def validation_ppl(run: Path, side: str, cfg: RunConfig, indices: np.ndarray, routes: np.ndarray) -> float:
    """Token-weighted perplexity on the valid sequences `indices` (the mixture: each by its routed expert)."""
    from smalltalk.data.splits import load_split
    from smalltalk.model.io import load_model_dir
    from smalltalk.train.evaluate import evaluate

    layout = RunLayout(run)
    valid = load_split(layout.data, "valid").dataset
    groups = [(layout.dense / "model", indices)] if side == "dense" else \
        [(layout.expert(k) / "model", indices[routes == k]) for k in range(cfg.num_experts)]
    nll, tokens = 0.0, 0
    for model_dir, idx in groups:
        if len(idx) == 0:
            continue
        model, _ = load_model_dir(model_dir)
        r = evaluate(model, valid, idx, batch_size=32)
        nll += r.loss * r.num_tokens
        tokens += r.num_tokens
    return math.exp(nll / tokens)


def final_pair(base_run: Path, out: Path, base: RunConfig, name: str, mixture: Point, dense: Point, log) -> dict:
    """Test split: the pipeline's own bundle -> evaluate -> report over the chosen experts and dense model."""
    run = out / name
    link_base(base_run, run, with_routes=False)  # the experts' link brings their valid routes
    for sub, src in (("experts", out / mixture.name / "experts"), ("dense", out / dense.name / "dense")):
        target = run / sub
        if target.is_symlink() and target.resolve() != src.resolve():
            target.unlink()  # the best point changed since the last call
        if not target.exists():
            target.symlink_to(src.resolve())
    cfg = point_config(base, mixture, dense, name)
    if RunLayout(run).config.is_file() and read_json(RunLayout(run).config) != cfg.to_dict():
        RunLayout(run).config.unlink()  # a re-selection: this directory only holds links and derived files
        for stale in ("bundle", "eval"):
            shutil.rmtree(run / stale, ignore_errors=True)
    run_pipeline(cfg, run, log=log)
    return read_json(RunLayout(run).results)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-run", type=Path, required=True, help="a run sharded at least (`--until shard`)")
    ap.add_argument("--out", type=Path, required=True, help="the sweep's run directories go here")
    ap.add_argument("--name", default="", help="results file suffix: fair_baseline_NAME.{json,md}")
    ap.add_argument("--dense-batches", default="",
                    help="comma-separated; default: E x b, 2 x b, b, b/2, b/4 (b: experts' batch)")
    ap.add_argument("--expert-batches", default="", help="comma-separated; default: b, b/2, b/4")
    ap.add_argument("--lrs", default="0.01,0.005,0.02", help="peak learning rates of both sides (in run order)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the JSON + Markdown go")
    ap.add_argument("--no-test", action="store_true", help="stop after the validation sweep")
    ap.add_argument("--no-train", action="store_true",
                    help="only summarize the points already finished (while a sweep runs elsewhere); implies --no-test")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    base = read_run_config(args.base_run)
    if not RunLayout(args.base_run).shards_manifest.is_file():
        raise SmallTalkError(f"{args.base_run}: not sharded yet; run `smalltalk run --config ... --out "
                             f"{args.base_run} --until shard` first")
    b, E = base.expert_train.batch_size, base.num_experts
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    dense_batches = ints(args.dense_batches) or [E * b, 2 * b, b, b // 2, b // 4]
    expert_batches = ints(args.expert_batches) or [b, b // 2, b // 4]
    lrs = [float(x) for x in args.lrs.split(",") if x]
    if not args.no_train:
        valid_routes(RunLayout(args.base_run), base)  # once, before the points link to it
    indices, routes = (np.load(RunLayout(args.base_run).valid_routes))
    rows = []
    for p in grid(base, dense_batches, expert_batches, lrs):
        run = args.out / p.name
        cached = run / "fair_baseline_point.json"
        if not cached.is_file() and args.no_train:
            continue
        if not cached.is_file():
            start = time.perf_counter()
            train_point(args.base_run, args.out, base, p, log)
            cfg = read_run_config(run)
            ppl = validation_ppl(run, p.side, cfg, indices, routes)
            atomic_write_json(cached, {**dataclasses.asdict(p), "valid_ppl": ppl,
                                       "train_seconds": round(time.perf_counter() - start, 1),
                                       "loadavg_1m": round(os.getloadavg()[0], 2)})
        row = read_json(cached)
        log(f"{p.name}: {p.max_steps} steps x batch {p.batch_size}, lr {p.lr:g}: valid ppl {row['valid_ppl']:.3f}")
        rows.append(row)
    report = {"base_run": str(args.base_run), "base_config": base.to_dict(), "points": rows,
              "valid_seqs": int(len(indices)),
              "environment": {"machine": platform.machine(), "cpus": os.cpu_count(),
                              "threads": None if args.no_train else args.threads}}
    best = {side: min((r for r in rows if r["side"] == side), key=lambda r: r["valid_ppl"])
            for side in ("dense", "mixture") if any(r["side"] == side for r in rows)}
    report["best"] = best
    report["points_planned"] = len(grid(base, dense_batches, expert_batches, lrs))
    if not (args.no_test or args.no_train):
        as_point = lambda r: Point(r["side"], r["batch_size"], r["max_steps"], r["lr"])  # noqa: E731
        protocol = {"mixture": Point("mixture", b, base.expert_train.max_steps, base.expert_train.lr),
                    "dense": Point("dense", E * b, base.expert_train.max_steps, base.expert_train.lr)}
        pairs = {"protocol": (protocol["mixture"], protocol["dense"]),
                 "tuned": (as_point(best["mixture"]), as_point(best["dense"]))}
        report["test"] = {}
        for name, (m, d) in pairs.items():
            if not (args.out / m.name).is_dir() or not (args.out / d.name).is_dir():
                log(f"{name}: {m.name} or {d.name} is not in the sweep; skipped")
                continue
            results = final_pair(args.base_run, args.out, base, f"test_{name}", m, d, log)
            ev = results["eval"]
            report["test"][name] = {"mixture": m.name, "dense": d.name, "mixture_ppl": ev["mixture"]["ppl"],
                                    "dense_ppl": ev["dense"]["ppl"], "improvement_pct": ev["improvement_pct"],
                                    "every_expert_beats_dense": ev["all_experts_beat_dense_on_their_segment"],
                                    "test_seqs": ev["num_seqs"],
                                    "training_flops_ratio": results["costs"]["mixture_training"]
                                    / results["costs"]["dense_training"]}
    stem = "fair_baseline" + (f"_{args.name}" if args.name else "")
    write_results(args.results, stem, report, render(report))
    return 0


def render(report: dict) -> str:
    base = report["base_config"]
    lines = [f"# Best dense vs best mixture at equal training FLOPs ({base['name']}, E = {base['num_experts']})", "",
             f"Base run `{report['base_run']}`; every point trains on the same tokens (equal FLOPs); selected on "
             f"{report['valid_seqs']} validation sequences.", "",
             "| side | steps x batch | lr | valid ppl | train s |", "|---|---|---|---|---|"]
    if len(report["points"]) < report.get("points_planned", 0):
        lines[2] += f" **Partial: {len(report['points'])} of {report['points_planned']} points finished.**"
    for r in sorted(report["points"], key=lambda r: (r["side"], -r["batch_size"], r["lr"])):
        mark = " **best**" if r == report["best"].get(r["side"]) else ""
        lines.append(f"| {r['side']} | {r['max_steps']} x {r['batch_size']} | {r['lr']:g} | {r['valid_ppl']:.3f}{mark} "
                     f"| {r['train_seconds']:.0f} |")
    if report.get("test"):
        lines += ["", "Test split (the pipeline's evaluation):", "",
                  "| pair | mixture | dense | mixture ppl | dense ppl | mixture vs dense | training FLOPs ratio |",
                  "|---|---|---|---|---|---|---|"]
        for name, t in report["test"].items():
            lines.append(f"| {name} | {t['mixture']} | {t['dense']} | {t['mixture_ppl']:.2f} | {t['dense_ppl']:.2f} "
                         f"| {t['improvement_pct']:+.2f}% | {t['training_flops_ratio']:.4f} |")
    env = report["environment"]
    threads = f", {env['threads']} torch threads" if env.get("threads") else " (threads: as the sweep's command)"
    lines += ["", f"{env['cpus']} CPUs ({env['machine']}){threads}; each point's wall time was measured on a machine "
              "shared with other jobs (its load average is in the JSON)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_main(main)
