"""The map: where a prefix-routed mixture beats the tuned dense model at equal training FLOPs.

For one base run (its data, E routers and shards) and one expert size, at several token budgets (training
tokens per expert parameter), both sides are tuned on a coarse grid of (batch, peak lr) and compared:

* dense: one model on the whole training split, the budget's E x N x tokens-per-parameter tokens;
* pure mixture: E experts, each on its shard, a 1/E share of those tokens each;
* split (optional, `--split-fractions`): the experts branch from the best dense line's stable checkpoint at a
  fraction f of the budget and continue on their shards (the `seed_fraction` of `smalltalk run`).

Every line (side, batch, lr) is one warm-up-stable-decay run to the largest budget: a budget's model is the
line's stable checkpoint at that budget's decay start, decayed on its own (the last `--decay-fraction` of its
steps). Warm-up is the same number of steps for every budget of a line, so each budget's schedule is the line's
up to its decay: one long run plus a short decay per budget instead of a run per budget. Points are selected
on `--valid-seqs` validation sequences; the selected pair of each budget is compared on `--test-seqs` test
sequences (the mixture: each sequence by the expert the routers send it to, as at inference).

Everything lives under OUT (lines/, budgets/, split/, point JSONs) and resumes when re-run with the same
arguments; run it in the background from a worktree:

    smalltalk run --config cpu --out runs/cpu --until shard
    python benchmarks/map.py --base-run runs/cpu --size 42k --budgets 2,8,30,100 --out runs/map-42k-e4

Writes benchmarks/results/map_<size>_e<E>.{json,md}; `--summarize` folds every map JSON into map.{json,md}, the
plot and the fitted law (smalltalk.plan).
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
from smalltalk.model.config import ModelConfig
from smalltalk.run.layout import RunLayout, read_run_config
from smalltalk.train import checkpoint as ckpt_lib
from smalltalk.train.config import TrainConfig

RESULTS = Path(__file__).resolve().parent / "results"

# Expert (and dense) shapes of the map; vocabulary and context come from the base run's data.
SIZES = {
    "42k": dict(hidden_size=32, num_layers=2, num_heads=4),    # the `cpu` preset's experts: 41,856 parameters
    "1m": dict(hidden_size=128, num_layers=5, num_heads=4),    # 1,057,152 parameters at vocabulary 512
}


@dataclasses.dataclass(frozen=True)
class Line:
    """One warm-up-stable-decay run: a side at a batch and peak learning rate."""

    side: str  # "dense" or "mixture"
    batch_size: int
    lr: float

    @property
    def name(self) -> str:
        return f"{self.side}_b{self.batch_size}_lr{self.lr:g}"


@dataclasses.dataclass(frozen=True)
class Plan:
    model: ModelConfig
    num_experts: int
    seq_len: int
    budgets: tuple[float, ...]      # requested tokens per expert parameter
    total_seqs: tuple[int, ...]     # training sequences of each budget (both sides)
    decay_fraction: float
    seed: int

    @property
    def params(self) -> int:
        return self.model.num_params()

    def tokens_per_param(self, j: int) -> float:
        return self.total_seqs[j] * (self.seq_len - 1) / (self.num_experts * self.params)

    def steps(self, line: Line, j: int) -> int:
        per_step = line.batch_size * (self.num_experts if line.side == "mixture" else 1)
        return self.total_seqs[j] // per_step

    def warmup(self, line: Line) -> int:
        """The same for every budget of a line (so budgets share its stable phase): a quarter of the smallest
        budget's steps, at most 50."""
        return max(1, min(50, self.steps(line, 0) // 4))

    def train_config(self, line: Line, j: int, seed: int, name: str) -> TrainConfig:
        steps = self.steps(line, j)
        return TrainConfig(lr=line.lr, min_lr_ratio=0.1, warmup_steps=self.warmup(line), schedule="wsd",
                           decay_fraction=self.decay_fraction, max_steps=steps, batch_size=line.batch_size,
                           eval_every=0, eval_batches=0, checkpoint_every=max(1, steps // 5), keep_last_k=2,
                           seed=seed, device="auto", name=name)


def make_plan(base_run: Path, size: str, budgets: list[float], batches: list[int], num_experts: int,
              decay_fraction: float, splits: list[float], seed: int) -> Plan:
    from smalltalk.data.manifest import read_data_manifest

    data = read_data_manifest(RunLayout(base_run).data)
    base = read_run_config(base_run)
    model = base.expert_model.replace(**SIZES[size], vocab_size=data.vocab_size, max_seq_len=data.seq_len,
                                      name=size)
    # Every budget is a whole number of steps at every batch of both sides, and its split points too.
    unit = math.lcm(*batches, *(num_experts * b for b in batches)) * (10 if splits else 1)
    probe = Plan(model, num_experts, data.seq_len, tuple(budgets), (), decay_fraction, seed)
    n = probe.params
    total = tuple(max(unit, round(b * num_experts * n / (data.seq_len - 1) / unit) * unit) for b in budgets)
    if len(set(total)) < len(total):
        raise SmallTalkError(f"--budgets {budgets}: two budgets round to the same {unit}-sequence multiple "
                             f"({list(total)} sequences); choose budgets further apart or fewer batch sizes")
    return dataclasses.replace(probe, total_seqs=total)


# ----------------------------------------------------------------------------- training


def copy_checkpoint(src: Path, run_dir: Path) -> None:
    """Start a trainer run directory from checkpoint `src` (atomic: a killed copy leaves a `.partial`)."""
    dst = run_dir / "checkpoints" / src.name
    if dst.is_dir():
        return
    staging = dst.parent / f".{src.name}.copy.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(src, staging)
    os.replace(staging, dst)


def stop_dir(line_dir: Path, step: int) -> Path:
    return line_dir / "stops" / ckpt_lib.step_dir_name(step)


def run_line(plan: Plan, line: Line, train, out: Path, k: int | None, stops: list[int], log) -> None:
    """Train one model of a line (the dense model, or expert k) to its last stop, keeping a copy of the
    checkpoint at every stop (decay starts and split seeds)."""
    from smalltalk.train.trainer import Trainer

    line_dir = out / "lines" / line.name / ("dense" if k is None else f"expert_{k}")
    if all(stop_dir(line_dir, s).is_dir() for s in stops):
        return
    seed = plan.seed if k is None else plan.seed + 1 + k
    cfg = plan.train_config(line, len(plan.budgets) - 1, seed, f"{line.name}-{k}")
    trainer = Trainer(plan.model, cfg, train, line_dir, progress=False)
    for step in sorted(set(stops)):
        if stop_dir(line_dir, step).is_dir():
            continue
        if trainer.step > step:
            raise SmallTalkError(f"{line_dir}: at step {trainer.step}, past stop {step} whose copy is missing; "
                                 f"delete {line_dir} and re-run")
        start = time.perf_counter()
        trainer.train(until_step=step)
        src = ckpt_lib.latest_checkpoint(trainer.ckpt_root)
        stop_dir(line_dir, step).parent.mkdir(parents=True, exist_ok=True)
        staging = stop_dir(line_dir, step).with_name(f".{src.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(src, staging)
        os.replace(staging, stop_dir(line_dir, step))
        log(f"{line_dir.relative_to(out)}: stable to step {step} ({time.perf_counter() - start:.0f}s)")


def decay(plan: Plan, cfg: TrainConfig, train, run_dir: Path, start: Path, log, branch: bool = False) -> Path:
    """Finish one budget's model from checkpoint `start`: resume it (same run: a decay) or, `branch`, load its
    weights and AdamW state into a fresh run of `cfg` at `cfg`'s own step (split training's experts)."""
    from smalltalk.train.layout import TrainerDir
    from smalltalk.train.trainer import Trainer

    if TrainerDir(run_dir).is_done():
        return TrainerDir(run_dir).model
    if not branch:
        copy_checkpoint(start, run_dir)
    trainer = Trainer(plan.model, cfg, train, run_dir, progress=False)
    if branch and trainer.step == 0:
        ckpt_lib.read_checkpoint_meta(start)
        ckpt_lib.load_checkpoint_weights(start, trainer.model, trainer.optimizer, trainer.device)
        trainer.step = branch_step(plan, cfg, start)
    begin = time.perf_counter()
    trainer.train()
    log(f"{run_dir}: {cfg.describe()} done ({time.perf_counter() - begin:.0f}s)")
    return TrainerDir(run_dir).model


def branch_step(plan: Plan, cfg: TrainConfig, seed_ckpt: Path) -> int:
    """The expert step at which the seed's sequences equal E x its batch x that step."""
    seed_step = int(read_json(seed_ckpt / "state.json")["step"])
    seed_batch = int(read_json(seed_ckpt / "config.json")["train"]["batch_size"])
    seqs = seed_step * seed_batch
    assert seqs % (plan.num_experts * cfg.batch_size) == 0, (seqs, plan.num_experts, cfg.batch_size)
    return seqs // (plan.num_experts * cfg.batch_size)


# ----------------------------------------------------------------------------- evaluation


def routed_ppl(models: list[Path], data, indices: np.ndarray, routes: np.ndarray | None) -> dict:
    """Token-weighted perplexity of `indices` (each by its routed model when `routes` is given), and per
    routed segment."""
    from smalltalk.model.io import load_model_dir
    from smalltalk.train.evaluate import evaluate

    groups = [(models[0], indices, None)] if routes is None else \
        [(models[k], indices[routes == k], k) for k in range(len(models))]
    nll, tokens, segments = 0.0, 0, {}
    for model_dir, idx, k in groups:
        if len(idx) == 0:
            continue
        model, _ = load_model_dir(model_dir)
        r = evaluate(model, data, idx, batch_size=32)
        if not math.isfinite(r.loss):
            raise SmallTalkError(f"{model_dir}: non-finite loss {r.loss} on evaluation")
        nll += r.loss * r.num_tokens
        tokens += r.num_tokens
        if k is not None:
            segments[k] = r.loss
    return {"ppl": math.exp(nll / tokens), "segment_loss": segments}


def split_routes(base_run: Path, out: Path, split: str, count: int, prefix_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, expert) of `count` evenly spaced sequences of `split`, routed by the base run's routers."""
    from smalltalk.data.splits import evenly_spaced, load_split
    from smalltalk.routing import rule
    from smalltalk.routing.routers_dir import load_routers
    from smalltalk.routing.score import StackedRouters, score_dataset

    path = out / f"{split}_routes.npy"
    if path.is_file():
        table = np.load(path)
        return table[0], table[1]
    layout = RunLayout(base_run)
    models, _ = load_routers(layout.routers, device="cpu")
    data = load_split(layout.data, split).dataset
    indices = evenly_spaced(len(data), count)
    scores = score_dataset(StackedRouters(models, device=torch.device("cpu")), data, indices, prefix_len)
    table = np.stack([indices, rule.route(scores)]).astype(np.int64)
    from smalltalk.io import atomic_open

    with atomic_open(path, "wb") as f:
        np.save(f, table)
    return table[0], table[1]


# ----------------------------------------------------------------------------- the sweep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-run", type=Path, required=True, help="a run sharded at least (`--until shard`)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", choices=sorted(SIZES), default="42k")
    ap.add_argument("--budgets", default="2,8,30,100", help="training tokens per expert parameter, ascending")
    ap.add_argument("--batches", default="8,32", help="batch sizes of both sides (per expert for the mixture)")
    ap.add_argument("--dense-batches", default="", help="the dense side's batch sizes, if not --batches")
    ap.add_argument("--mixture-batches", default="", help="the mixture side's batch sizes (per expert), if not --batches")
    ap.add_argument("--lrs", default="0.01,0.02", help="peak learning rates of both sides")
    ap.add_argument("--decay-fraction", type=float, default=0.2)
    ap.add_argument("--split-fractions", default="", help="split training's seed fractions, e.g. 0.5,0.8")
    ap.add_argument("--valid-seqs", type=int, default=2048)
    ap.add_argument("--test-seqs", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="", help="results stem (default map_<size>_e<E>)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the JSON + Markdown go")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    from smalltalk.data.shards import TokenDataset
    from smalltalk.data.splits import load_split

    layout = RunLayout(args.base_run)
    if not layout.shards_manifest.is_file():
        raise SmallTalkError(f"{args.base_run}: not sharded yet; run `smalltalk run --config ... --out {args.base_run} "
                             "--until shard` first")
    base = read_run_config(args.base_run)
    E = base.num_experts
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    budgets, lrs, splits = floats(args.budgets), floats(args.lrs), floats(args.split_fractions)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    side_batches = {"dense": ints(args.dense_batches or args.batches),
                    "mixture": ints(args.mixture_batches or args.batches)}
    batches = sorted(set(side_batches["dense"] + side_batches["mixture"]))
    if budgets != sorted(budgets):
        raise SmallTalkError(f"--budgets {args.budgets}: give them in ascending order")
    if any(not 0 < f <= 1 - args.decay_fraction for f in splits):
        raise SmallTalkError(f"--split-fractions {args.split_fractions}: each must be in (0, {1 - args.decay_fraction:g}] "
                             "(the seed is the dense line's stable phase)")
    plan = make_plan(args.base_run, args.size, budgets, batches, E, args.decay_fraction, splits, base.seed)
    pin_plan(args.out, plan)
    train = load_split(layout.data, "train")
    corpus_seqs = len(train.dataset)
    epochs = [t / corpus_seqs for t in plan.total_seqs]
    log(f"map {args.size} ({plan.params:,} params), E={E}: budgets {[f'{plan.tokens_per_param(j):.1f}' for j in range(len(budgets))]} "
        f"tokens/param = {list(plan.total_seqs)} sequences ({', '.join(f'{e:.2f}' for e in epochs)} epochs)")
    if max(epochs) > 4:
        log(f"warning: the largest budget is {max(epochs):.1f} epochs of {layout.data}; past ~4 repeated data helps "
            "less (use a larger base run)")
    shards = [TokenDataset.from_dir(layout.expert_shard(k)) for k in range(E)]
    valid = load_split(layout.data, "valid").dataset
    test = load_split(layout.data, "test").dataset
    v_idx, v_routes = split_routes(args.base_run, args.out, "valid", args.valid_seqs, base.prefix_len)
    lines = [Line(side, b, lr) for lr in lrs for side in ("dense", "mixture") for b in side_batches[side]]
    # Budget by budget, every line advanced to it: an interrupted map has compared its smaller budgets whole.
    stops = {line: stops_of(plan, line, splits) for line in lines}
    points = []
    for j in range(len(budgets)):
        for line in lines:
            starts, dense_line = stops[line][0], line.side == "dense"
            due = [s for s in sorted(set(starts + stops[line][1])) if s <= starts[j]]
            for k in ([None] if dense_line else range(E)):
                run_line(plan, line, train if dense_line else shards[k], args.out, k, due, log)
            points.append(line_point(plan, line, j, starts[j], train, shards, args.out, valid, v_idx, v_routes, log))
            log(f"budget {j} ({plan.tokens_per_param(j):.1f} tok/param) {line.name}: valid ppl {points[-1]['valid_ppl']:.3f}")
        # Each finished budget is compared (and written) before the next one starts.
        report = evaluate_budgets(args, plan, base, points, splits, train, shards, test, log)
        write_results(args.results, args.name or f"map_{args.size}_e{E}", report, render(report), show=j == len(budgets) - 1)
    return 0


def pin_plan(out: Path, plan: Plan) -> None:
    """Processes sharing OUT (one per learning rate, then the merge) must train the same budgets, or the merge would
    compare lines at different token counts: the first writes the plan, every later one must match it. The budgets'
    rounding depends on --batches and --split-fractions, so those must match too."""
    path = out / "plan.json"
    mine = {"size": plan.model.name, "params": plan.params, "num_experts": plan.num_experts,
            "total_seqs": list(plan.total_seqs), "decay_fraction": plan.decay_fraction, "seed": plan.seed}
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, mine)
        return
    theirs = read_json(path)
    if theirs != mine:
        diff = ", ".join(f"{k} {theirs.get(k)} there, {v} here" for k, v in mine.items() if theirs.get(k) != v)
        raise SmallTalkError(f"{path}: --out was planned differently ({diff}); give every process of one map the same "
                             "--size, --budgets, --batches and --split-fractions (they set the budgets' rounding), or "
                             "another --out")


def line_point(plan: Plan, line: Line, j: int, start_step: int, train, shards: list, out: Path, valid, v_idx,
               v_routes, log) -> dict:
    """Budget j's model of a line (each expert's, for the mixture) decayed from the line's stable checkpoint at
    `start_step` and scored on the validation subset; cached in the budget's point.json."""
    point_file = out / "budgets" / f"{j}" / line.name / "point.json"
    if not point_file.is_file():
        models = []
        for k in ([None] if line.side == "dense" else range(plan.num_experts)):
            who = "dense" if k is None else f"expert_{k}"
            seed = plan.seed if k is None else plan.seed + 1 + k
            cfg = plan.train_config(line, j, seed, f"{line.name}-{j}-{who}")
            start = stop_dir(out / "lines" / line.name / who, start_step)
            run_dir = out / "budgets" / f"{j}" / line.name / who
            models.append(decay(plan, cfg, train if k is None else shards[k], run_dir, start, log))
        ev = routed_ppl(models, valid, v_idx, None if line.side == "dense" else v_routes)
        atomic_write_json(point_file, {**dataclasses.asdict(line), "budget": j, "valid_ppl": ev["ppl"],
                                       "steps": plan.steps(line, j), "loadavg_1m": round(os.getloadavg()[0], 2)})
    point = read_json(point_file)
    if point["steps"] != plan.steps(line, j):
        raise SmallTalkError(f"{point_file}: trained for {point['steps']} steps, this plan's budget {j} is "
                             f"{plan.steps(line, j)}; it belongs to another plan: use another --out")
    return point


def stops_of(plan: Plan, line: Line, splits: list[float]) -> tuple[list[int], list[int]]:
    """(decay start of each budget, split seeds): the steps at which a line keeps a checkpoint (seeds: dense
    lines only)."""
    starts = [plan.train_config(line, j, 0, "").decay_start for j in range(len(plan.budgets))]
    seeds = [round(f * plan.steps(line, j)) for f in splits for j in range(len(plan.budgets))] \
        if line.side == "dense" else []
    return starts, seeds


def evaluate_budgets(args, plan: Plan, base, points: list[dict], splits: list[float], train, shards, test, log) -> dict:
    """Per budget: the best line of each side (validation), both on the test subset, and split training."""
    E = plan.num_experts
    t_idx, t_routes = split_routes(args.base_run, args.out, "test", args.test_seqs, base.prefix_len)
    budgets = []
    for j in sorted({p["budget"] for p in points}):
        here = [p for p in points if p["budget"] == j]
        best = {s: min((p for p in here if p["side"] == s), key=lambda p: p["valid_ppl"]) for s in ("dense", "mixture")}
        lines = {s: Line(best[s]["side"], best[s]["batch_size"], best[s]["lr"]) for s in best}
        # One cache per selected pair: processes sweeping disjoint grids into one OUT never read each other's.
        cache = args.out / "budgets" / f"{j}" / f"test_{lines['dense'].name}_{lines['mixture'].name}.json"
        if not cache.is_file() or read_json(cache).get("lines") != {s: l.name for s, l in lines.items()}:
            root = args.out / "budgets" / f"{j}"
            dense = routed_ppl([root / lines["dense"].name / "dense" / "model"], test, t_idx, None)
            experts = [root / lines["mixture"].name / f"expert_{k}" / "model" for k in range(E)]
            mix = routed_ppl(experts, test, t_idx, t_routes)
            dense_seg = {k: routed_ppl([root / lines["dense"].name / "dense" / "model"], test, t_idx[t_routes == k],
                                       None)["ppl"] for k in range(E) if (t_routes == k).any()}
            atomic_write_json(cache, {"lines": {s: l.name for s, l in lines.items()}, "dense_ppl": dense["ppl"],
                                      "mixture_ppl": mix["ppl"],
                                      "expert_segment_ppl": {str(k): math.exp(v) for k, v in mix["segment_loss"].items()},
                                      "dense_segment_ppl": {str(k): v for k, v in dense_seg.items()}})
        result = read_json(cache)
        row = {"budget": j, "tokens_per_param": plan.tokens_per_param(j), "total_seqs": plan.total_seqs[j],
               "tokens": plan.total_seqs[j] * (plan.seq_len - 1), **result,
               "improvement_pct": 100 * (1 - result["mixture_ppl"] / result["dense_ppl"]),
               "every_expert_beats_dense": all(result["expert_segment_ppl"][k] <= result["dense_segment_ppl"][k]
                                               for k in result["expert_segment_ppl"]),
               "best_valid": best, "split": []}
        for f in splits:
            row["split"].append(split_point(args, plan, j, f, lines, result["dense_ppl"], shards, test, t_idx,
                                            t_routes, log))
        budgets.append(row)
        log(f"budget {j}: dense {row['dense_ppl']:.3f} ({lines['dense'].name}) vs mixture {row['mixture_ppl']:.3f} "
            f"({lines['mixture'].name}): {row['improvement_pct']:+.2f}%"
            + "".join(f"; split f={s['fraction']:g}: {s['improvement_pct']:+.2f}%" for s in row["split"]))
    return {"size": args.size, "params": plan.params, "num_experts": E, "base_run": str(args.base_run), "seed": plan.seed,
            "decay_fraction": plan.decay_fraction, "batches": sorted({p["batch_size"] for p in points}),
            "side_batches": {s: sorted({p["batch_size"] for p in points if p["side"] == s}) for s in ("dense", "mixture")},
            "lrs": sorted({p["lr"] for p in points}), "valid_seqs": args.valid_seqs, "test_seqs": len(t_idx),
            "corpus_train_seqs": len(train.dataset), "points": points, "budgets": budgets,
            "environment": {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": args.threads,
                            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0)
                            if torch.cuda.is_available() else None}}


def split_point(args, plan: Plan, j: int, f: float, lines: dict, dense_ppl: float, shards, test, t_idx, t_routes,
                log) -> dict:
    """Experts branched from the best dense line's stable checkpoint at f of budget j, continued (with the best
    mixture line's batch and lr) on their shards to the end of their WSD schedule."""
    E = plan.num_experts
    dense_line, mix_line = lines["dense"], lines["mixture"]
    root = args.out / "split" / f"{j}" / f"f{f:g}"
    cache = root / f"{mix_line.name}_from_{dense_line.name}" / "test.json"
    key = {"dense": dense_line.name, "mixture": mix_line.name}
    if not cache.is_file() or read_json(cache).get("lines") != key:
        seed_ckpt = stop_dir(args.out / "lines" / dense_line.name / "dense", round(f * plan.steps(dense_line, j)))
        experts = []
        for k in range(E):
            cfg = plan.train_config(mix_line, j, plan.seed + 1 + k, f"split-{j}-f{f:g}-expert_{k}")
            run_dir = root / f"{mix_line.name}_from_{dense_line.name}" / f"expert_{k}"
            experts.append(decay(plan, cfg, shards[k], run_dir, seed_ckpt, log, branch=True))
        mix = routed_ppl(experts, test, t_idx, t_routes)
        atomic_write_json(cache, {"lines": key, "mixture_ppl": mix["ppl"],
                                  "expert_segment_ppl": {str(k): math.exp(v) for k, v in mix["segment_loss"].items()}})
    result = read_json(cache)
    return {"fraction": f, **result, "improvement_pct": 100 * (1 - result["mixture_ppl"] / dense_ppl)}


def grid_batches(report: dict) -> str:
    """The batches swept: one list when both sides shared them, else each side's."""
    sides = report.get("side_batches") or {s: report["batches"] for s in ("dense", "mixture")}
    if sides["dense"] == sides["mixture"]:
        return str(sides["dense"])
    return f"{sides['dense']} (dense) / {sides['mixture']} (mixture, per expert)"


def render(report: dict) -> str:
    E = report["num_experts"]
    lines = [f"# Map: mixture of {E} vs the tuned dense model, {report['size']} experts ({report['params']:,} parameters)",
             "", f"Base run `{report['base_run']}`. Both sides tuned on batch {grid_batches(report)} x peak lr "
             f"{report['lrs']} (a coarse grid; WSD, decay over the last {report['decay_fraction']:g} of each budget), "
             f"selected on {report['valid_seqs']} validation sequences; test ppl on {report['test_seqs']} test sequences "
             "(the mixture routes each by argmax of prefix scores). Equal training tokens, hence FLOPs, on both sides "
             "(routers not counted here: see the run reports' cost tables).", "",
             "| tokens / expert param | training tokens | dense (best line) | dense ppl | mixture (best line) | "
             "mixture ppl | mixture vs dense | every expert beats dense on its segment | split |",
             "|---|---|---|---|---|---|---|---|---|"]
    for b in report["budgets"]:
        split = "; ".join(f"f={s['fraction']:g}: {s['mixture_ppl']:.2f} ({s['improvement_pct']:+.1f}%)"
                          for s in b["split"]) or "–"
        lines.append(f"| {b['tokens_per_param']:.1f} | {b['tokens']:,} | {b['lines']['dense']} | {b['dense_ppl']:.2f} | "
                     f"{b['lines']['mixture']} | {b['mixture_ppl']:.2f} | {b['improvement_pct']:+.2f}% | "
                     f"{b['every_expert_beats_dense']} | {split} |")
    env = report["environment"]
    lines += ["", f"{env['cpus']} CPUs ({env['machine']}), {env['threads']} torch threads"
              + (f", GPU {env['cuda']}" if env.get("cuda") else "") + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_main(main)
