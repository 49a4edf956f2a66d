"""`smalltalk run`: the whole SmallTalk pipeline, stage by stage, resumable.

    prepare -> routers (EM) -> shard -> seed -> experts -> dense -> bundle -> evaluate -> report

(seed: split training only, `seed_fraction` > 0; see seed.py.)

Each stage writes its output under the run directory (layout.py) and is *complete* when its
manifest exists; complete stages are skipped, and an interrupted stage resumes from its own
checkpoints (prepare, router EM, sharding and every trainer are resumable). So a killed run is
continued by re-running the same command. A run directory remembers its resolved config
(``run_config.json``); re-running with a config that would change finished work is refused with
the differing keys named (only ``name``, ``device`` and ``eval`` may change; a changed ``eval``
re-runs the evaluation).

Experts run one after another in this process by default; ``expert_workers=P`` runs them as P
parallel ``smalltalk train-expert`` processes instead (each with its share of the CPU threads).
For experts on separate machines, stop after sharding (``until="shard"``), run
``smalltalk train-expert --run RUN --expert k`` wherever, then re-run `smalltalk run` to finish
(docs/running-experts.md).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..data.manifest import is_prepared, read_data_manifest
from ..errors import SmallTalkError
from ..io import atomic_write_json, read_json
from ..locks import DirLock
from ..routing.routers_dir import has_routers, read_routers_manifest
from ..routing.sharding import read_shards_manifest
from ..train.layout import read_metrics
from .config import RunConfig
from .dense import dense_done, train_dense
from .experts import check_expert_provenance, check_shards, expert_done, train_expert
from .layout import RunLayout
from .seed import seed_done, train_seed

STAGES = ("prepare", "routers", "shard", "seed", "experts", "dense", "bundle", "evaluate", "report")
# Keys of the run config that may change between invocations on one run directory.
_MUTABLE_KEYS = {"name", "device", "eval"}


def check_run_config(layout: RunLayout, cfg: RunConfig) -> None:
    """Write ``run_config.json`` on the first call; later, refuse a config that changes finished work."""
    new = cfg.to_dict()
    if not layout.config.is_file():
        atomic_write_json(layout.config, new)
        return
    old = read_json(layout.config)
    diffs = []
    for key in sorted(set(old) | set(new)):
        if key in _MUTABLE_KEYS or old.get(key) == new.get(key):
            continue
        if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
            inner = sorted(k for k in set(old[key]) | set(new[key])
                           if old[key].get(k) != new[key].get(k) and k not in ("device", "progress", "out_dir"))
            diffs += [f"{key}.{k}: {old[key].get(k)!r} -> {new[key].get(k)!r}" for k in inner]
        else:
            diffs.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    if diffs:
        raise SmallTalkError(f"{layout.config}: this run directory was started with another config "
                             f"({'; '.join(diffs[:4])}{' ...' if len(diffs) > 4 else ''}); use a new --out, or the "
                             "same config to resume")
    atomic_write_json(layout.config, new)  # name / device / eval may have changed


# ----------------------------------------------------------------------------- stages


def corpus_view(layout: RunLayout, cfg: RunConfig) -> tuple[str, ...]:
    """The corpus to prepare: the configured one, or with `cfg.domains` a directory of links to just those
    domain files of it (``<run>/corpus/<split>/<domain>.jsonl.gz``), keeping the corpus's own splits."""
    if not cfg.domains:
        return cfg.data.corpus
    from ..paths import default_corpus_dir

    root = Path(cfg.data.corpus[0]) if cfg.data.corpus else default_corpus_dir()
    view = layout.root / "corpus"
    for split in ("train", "valid", "test"):
        for domain in cfg.domains:
            found = sorted((root / split).glob(f"{domain}.*"))
            if not found:
                raise SmallTalkError(f"{root / split}: no file for domain {domain!r} (expected {domain}.jsonl.gz); "
                                     "fix `domains` in the run config or the corpus path")
            for src in found:
                link = view / split / src.name
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to(src.resolve())
    return (str(view),)


def _prepare(layout: RunLayout, cfg: RunConfig, ctx: dict) -> None:
    from ..data.prepare import prepare

    prepare(cfg.data.replace(corpus=corpus_view(layout, cfg), out_dir=str(layout.data),
                             progress=ctx["progress"] is not False), log=ctx["log"])


def _routers(layout: RunLayout, cfg: RunConfig, ctx: dict) -> None:
    from ..routing.em import train_routers

    train_routers(layout.data, layout.root, cfg.routers, log=ctx["log"])


def _shard(layout: RunLayout, cfg: RunConfig, ctx: dict) -> None:
    from ..routing.sharding import shard_dataset
    from ..mixture.inference import resolve_device

    shard_dataset(layout.data, layout.routers, layout.shards, splits=("train",),
                  batch_size=cfg.routers.score_batch_size, device=str(resolve_device(cfg.device)), log=ctx["log"])


def _seed(layout: RunLayout, cfg: RunConfig, ctx: dict) -> None:
    train_seed(layout.root, cfg=cfg, progress=ctx["progress"], log=ctx["log"])


def _experts(layout: RunLayout, cfg: RunConfig, ctx: dict) -> None:
    check_shards(layout, cfg)
    todo = [k for k in range(cfg.num_experts) if not expert_done(layout, k)]
    workers = min(ctx["expert_workers"], len(todo))
    if workers <= 1:
        for k in todo:
            train_expert(layout.root, k, cfg=cfg, progress=ctx["progress"], log=ctx["log"])
        return
    run_expert_processes(layout.root, todo, workers, log=ctx["log"])


def run_expert_processes(run_dir: Path, experts: list[int], workers: int, log=print) -> None:
    """Train `experts` as independent OS processes, at most `workers` at a time (each: its own
    ``smalltalk train-expert``, no communication), splitting the CPU threads between them."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    pending, running, failed = list(experts), {}, []
    while pending or running:
        while pending and len(running) < workers:
            k = pending.pop(0)
            cmd = [sys.executable, "-m", "smalltalk", "train-expert", "--run", str(run_dir), "--expert", str(k),
                   "--threads", str(threads)]
            log_path = RunLayout(run_dir).expert_log(k)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            running[k] = (subprocess.Popen(cmd, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT), log_path)
            log(f"expert {k}: started process {running[k][0].pid} ({threads} threads), log {log_path}")
        time.sleep(0.5)
        for k, (proc, log_path) in list(running.items()):
            if proc.poll() is not None:
                del running[k]
                if proc.returncode:
                    failed.append(k)
                    tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] if log_path.exists() else []
                    log(f"expert {k}: process exited with status {proc.returncode}: {' '.join(tail)}")
                else:
                    log(f"expert {k}: done")
    if failed:
        raise SmallTalkError(f"experts {failed} failed (logs: {RunLayout(run_dir).root / 'experts'}/expert_K.log); "
                             "the others are saved: re-run the same command to retry the failed ones")


def _dense(layout: RunLayout, cfg: RunConfig, ctx: dict) -> None:
    train_dense(layout.root, cfg=cfg, progress=ctx["progress"], log=ctx["log"])


def _bundle(layout: RunLayout, cfg: RunConfig, ctx: dict) -> None:
    from ..mixture.bundle import build_bundle

    shards = check_shards(layout, cfg)
    E = cfg.num_experts
    for k in range(E):
        check_expert_provenance(layout, k)
    data = read_data_manifest(layout.data)
    build_bundle(layout.bundle, router_dirs=[layout.router(e) for e in range(E)],
                 expert_dirs=[layout.expert_model(k) for k in range(E)],
                 tokenizer_file=data.tokenizer_file, prefix_len=cfg.prefix_len,
                 train_seqs=shards.train_counts,
                 manifests={"data": data.path, "routers": read_routers_manifest(layout.routers).path,
                            "shards": shards.path},
                 run_config=cfg.to_dict())


def _evaluate(layout: RunLayout, cfg: RunConfig, ctx: dict) -> None:
    from ..mixture.evaluate import evaluate_mixture

    result = evaluate_mixture(layout.bundle, layout.dense_model, layout.data, cfg.eval,
                              progress=lambda what: ctx["log"](f"evaluate: scored the test split with {what}"))
    atomic_write_json(layout.eval_results, result)


def _report(layout: RunLayout, cfg: RunConfig, ctx: dict) -> None:
    from .report import write_report

    results = collect_results(layout, cfg)
    atomic_write_json(layout.results, results)
    write_report(layout.root, results)


def _eval_done(layout: RunLayout, cfg: RunConfig) -> bool:
    if not layout.eval_results.is_file():
        return False
    import dataclasses

    return read_json(layout.eval_results).get("config") == dataclasses.asdict(cfg.eval)


DONE: dict[str, Callable[[RunLayout, RunConfig], bool]] = {
    "prepare": lambda L, c: is_prepared(L.data),
    "routers": lambda L, c: has_routers(L.routers),
    "shard": lambda L, c: L.shards_manifest.is_file(),
    "seed": lambda L, c: c.split() is None or seed_done(L),
    "experts": lambda L, c: all(expert_done(L, k) for k in range(c.num_experts)),
    "dense": lambda L, c: dense_done(L),
    "bundle": lambda L, c: (L.bundle / "bundle.json").is_file(),
    "evaluate": _eval_done,
    "report": lambda L, c: False,  # cheap: always re-rendered from the results
}
RUN: dict[str, Callable[[RunLayout, RunConfig, dict], None]] = {
    "prepare": _prepare, "routers": _routers, "shard": _shard, "seed": _seed, "experts": _experts, "dense": _dense,
    "bundle": _bundle, "evaluate": _evaluate, "report": _report,
}


class StageClock:
    """Times one stage into ``stages.json``, rewriting its entry every `every_s` seconds while it runs: a
    killed attempt keeps the time it spent (to within `every_s`), and the next attempt adds to it. Evaluate
    and report are re-done whole, so only their last attempt counts."""

    def __init__(self, path: Path, timings: dict, stage: str, every_s: float = 10.0):
        self.path, self.timings, self.stage, self.every_s = path, timings, stage, every_s
        self.before = timings.get(stage, 0.0) if stage not in ("report", "evaluate") else 0.0
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _write(self) -> None:
        self.seconds = time.perf_counter() - self._start
        self.timings[self.stage] = round(self.before + self.seconds, 2)
        atomic_write_json(self.path, self.timings)

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            self._write()

    def __enter__(self) -> "StageClock":
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._write()  # also after an error: a failed attempt's time counts like a killed one's


def run_pipeline(cfg: RunConfig, run_dir: str | Path, *, until: str | None = None, expert_workers: int = 1,
                 progress: bool | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Run every stage not yet complete, in order, up to and including `until`; returns the timings."""
    if until is not None and until not in STAGES:
        raise SmallTalkError(f"--until {until!r}: choose one of {', '.join(STAGES)}")
    if expert_workers < 1:
        raise SmallTalkError(f"--expert-workers {expert_workers} must be >= 1")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    layout = RunLayout(run_dir)
    with DirLock(layout.root, "smalltalk run"):
        return _run_stages(layout, cfg, until, expert_workers, progress, log)


def _run_stages(layout: RunLayout, cfg: RunConfig, until: str | None, expert_workers: int, progress: bool | None,
                log: Callable[[str], None]) -> dict:
    check_run_config(layout, cfg)
    timings = read_json(layout.stages) if layout.stages.is_file() else {}
    ctx = {"log": log, "progress": progress, "expert_workers": expert_workers}
    stages = STAGES[:STAGES.index(until) + 1] if until else STAGES
    log(f"run {layout.root}: {cfg.describe()}")
    for i, stage in enumerate(stages, 1):
        head = f"[{i}/{len(STAGES)}] {stage}"
        if stage == "seed" and cfg.split() is None:
            log(f"{head}: not used (seed_fraction 0: every expert starts from scratch)")
            continue
        if DONE[stage](layout, cfg):
            log(f"{head}: complete, skipped")
            continue
        log(f"{head}: running")
        with StageClock(layout.stages, timings, stage) as clock:
            RUN[stage](layout, cfg, ctx)
        log(f"{head}: done in {clock.seconds:.1f}s")
    if "report" in stages:
        ev = read_json(layout.eval_results)
        log(f"mixture test ppl {ev['mixture']['ppl']:.2f} vs dense {ev['dense']['ppl']:.2f} "
            f"({ev['improvement_pct']:+.2f}%); report: {layout.report}")
    return timings


# ----------------------------------------------------------------------------- results


def _val_curve(run: Path) -> dict[int, tuple[float, int]]:
    """{step: (val_loss, flops)} from a trainer's metrics.jsonl."""
    return {int(r["step"]): (float(r["val_loss"]), int(r.get("flops", 0))) for r in read_metrics(run) if "val_loss" in r}


def training_curves(layout: RunLayout, cfg: RunConfig, overhead_flops: int) -> dict:
    """Validation perplexity vs cumulative training FLOPs for the mixture and dense (Figure 2 style).

    The mixture's validation loss at a step is the experts' losses on their own valid segments,
    weighted by segment size; its FLOPs are all experts' plus the routers' and the seed's (spent before).
    """
    routes = np.load(layout.valid_routes)[1] if layout.valid_routes.is_file() else None
    curves = {"mixture": [], "dense": []}
    if routes is not None:
        shares = np.bincount(routes, minlength=cfg.num_experts) / len(routes)
        per_expert = [_val_curve(layout.expert(k)) for k in range(cfg.num_experts)]
        steps = sorted(set.intersection(*[set(c) for k, c in enumerate(per_expert) if shares[k] > 0]))
        for step in steps:
            loss = sum(shares[k] * per_expert[k][step][0] for k in range(cfg.num_experts) if shares[k] > 0)
            flops = sum(c.get(step, (0, 0))[1] for c in per_expert) + overhead_flops
            curves["mixture"].append({"step": step, "flops": flops, "ppl": math.exp(loss)})
    for step, (loss, flops) in sorted(_val_curve(layout.dense).items()):
        curves["dense"].append({"step": step, "flops": flops, "ppl": math.exp(loss)})
    if cfg.split() is not None:  # the shared seed's stretch of the curve (its FLOPs are in the overhead)
        curves["seed"] = [{"step": step, "flops": flops, "ppl": math.exp(loss)}
                          for step, (loss, flops) in sorted(_val_curve(layout.seed).items())]
    return curves


def run_costs_of(layout: RunLayout, cfg: RunConfig):
    from .costs import run_costs

    data = read_data_manifest(layout.data)
    routers = read_routers_manifest(layout.routers)
    shards = read_shards_manifest(layout.shards)
    em, iterations = routers.em, routers.iterations_completed
    S = data.seq_len
    dense, split = cfg.dense_train(), cfg.split()
    return run_costs(
        expert_cfg=cfg.expert_model.replace(vocab_size=data.vocab_size, max_seq_len=S),
        router_cfg=routers.router_model, num_experts=cfg.num_experts, seq_len=S,
        prefix_len=routers.prefix_len, expert_steps=cfg.expert_train.max_steps,
        expert_batch_size=cfg.expert_train.batch_size, dense_steps=dense.max_steps, dense_batch_size=dense.batch_size,
        router_steps=em.steps_per_iteration * iterations, seed_steps=split.seed_steps if split else 0,
        expert_start=split.expert_start if split else 0,
        router_batch_size=em.batch_size, router_train_len=routers.prefix_len,
        em_scored_seqs=em.num_seqs * iterations,
        shard_scored_seqs=shards.train_num_seqs)


def collect_results(layout: RunLayout, cfg: RunConfig) -> dict:
    import torch

    from ..model.flops import inference_flops

    costs = run_costs_of(layout, cfg)
    overhead = costs.mixture_training - costs.experts_training
    timings = read_json(layout.stages) if layout.stages.is_file() else {}
    ev = read_json(layout.eval_results)
    # Routing on fewer tokens (M-hat < M) is also cheaper: the inference overhead of each sweep point.
    router_cfg = read_routers_manifest(layout.routers).router_model
    for s in ev.get("prefix_sweep", []):
        routers = cfg.num_experts * inference_flops(router_cfg, int(s["prefix_len"]))
        s["inference_overhead_pct"] = 100.0 * routers / costs.dense_inference
    return {
        "name": cfg.name, "num_experts": cfg.num_experts, "prefix_len": cfg.prefix_len,
        "eval": ev, "costs": costs.to_dict(),
        "curves": training_curves(layout, cfg, overhead), "timings_s": timings,
        "wall_s": round(sum(timings.values()), 1),
        "environment": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "cuda": torch.cuda.is_available(), "loadavg_1m": round(os.getloadavg()[0], 2)},
        "config": cfg.to_dict(),
    }
