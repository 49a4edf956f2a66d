"""Error bars against the tuned dense: one map point per seed (`map.py` at one budget, each seed its own base run)
gathered into mean +- sample standard deviation, the tuned counterpart of `seeds.py` (which compares with the paper's
protocol dense).

    python benchmarks/tuned_seeds.py benchmarks/results/tuned_cpu_seed{0,1,2}.json --name tuned_cpu_seeds

Each report must hold exactly one budget, and all of them the same expert size, number of experts and budget; the
seed is read from the report (or its base run's `run_config.json`). Writes benchmarks/results/NAME.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from _results import run_main, write_results
from map import grid_batches
from smalltalk.errors import SmallTalkError
from smalltalk.io import read_json

RESULTS = Path(__file__).resolve().parent / "results"


def seed_of(report: dict, path: Path) -> int:
    if "seed" in report:
        return int(report["seed"])
    config = Path(report["base_run"]) / "run_config.json"
    if not config.is_file():
        raise SmallTalkError(f"{path}: no seed in the report and no {config}; re-run map.py to record it")
    return int(read_json(config)["seed"])


def row_of(path: Path) -> dict:
    report = read_json(path)
    if len(report["budgets"]) != 1:
        raise SmallTalkError(f"{path}: {len(report['budgets'])} budgets; a seed's point is one budget (map.py --budgets X)")
    b = report["budgets"][0]
    segments = {k: 100 * (1 - v / b["dense_segment_ppl"][k]) for k, v in b["expert_segment_ppl"].items()}
    return {"seed": seed_of(report, path), "source": str(path), "size": report["size"], "params": report["params"],
            "num_experts": report["num_experts"], "tokens_per_param": b["tokens_per_param"], "tokens": b["tokens"],
            "grid": {"batches": grid_batches(report), "lrs": report["lrs"]},
            "dense_line": b["lines"]["dense"], "mixture_line": b["lines"]["mixture"],
            "dense_ppl": b["dense_ppl"], "mixture_ppl": b["mixture_ppl"], "improvement_pct": b["improvement_pct"],
            "expert_vs_dense_on_segment_pct": segments, "every_expert_beats_dense": b["every_expert_beats_dense"]}


def summarise(rows: list[dict]) -> dict:
    shape = {(r["size"], r["num_experts"], round(r["tokens"])) for r in rows}
    if len(shape) != 1:
        raise SmallTalkError(f"reports of different points {sorted(shape)}: give one size, E and budget")
    if len({r["seed"] for r in rows}) != len(rows):
        raise SmallTalkError(f"seeds {[r['seed'] for r in rows]}: each report must be a different seed")

    def stat(key: str) -> dict:
        xs = [r[key] for r in rows]
        return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}

    return {"rows": sorted(rows, key=lambda r: r["seed"]), "n": len(rows),
            **{k: stat(k) for k in ("dense_ppl", "mixture_ppl", "improvement_pct")}}


def render(s: dict) -> str:
    r0 = s["rows"][0]
    out = [f"# Mixture of {r0['num_experts']} vs the tuned dense over {s['n']} seeds ({r0['size']} experts, "
           f"{r0['tokens_per_param']:.1f} training tokens per expert parameter)", "",
           "Each seed: its own routers and shards; both sides tuned (batch x peak lr, WSD) on validation and compared "
           "on test at equal training tokens (`map.py` at one budget). Grids and chosen lines per seed below.", "",
           "| seed | grid (batch x lr) | dense (best line) | dense ppl | mixture (best line) | mixture ppl | "
           "mixture vs dense | experts vs dense on their segments |", "|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        seg = ", ".join(f"{v:+.1f}%" for _, v in sorted(r["expert_vs_dense_on_segment_pct"].items()))
        grid = f"batch {r['grid']['batches']} x lr {r['grid']['lrs']}"
        out.append(f"| {r['seed']} | {grid} | {r['dense_line']} | {r['dense_ppl']:.2f} | {r['mixture_line']} | "
                   f"{r['mixture_ppl']:.2f} | {r['improvement_pct']:+.2f}% | {seg} |")
    pm = lambda k, f: f"{s[k]['mean']:{f}} +- {s[k]['std']:{f.lstrip('+')}}"  # noqa: E731
    out += ["", f"Mean +- sample std over seeds {[r['seed'] for r in s['rows']]}: dense {pm('dense_ppl', '.2f')}, "
            f"mixture {pm('mixture_ppl', '.2f')}, **mixture vs tuned dense {pm('improvement_pct', '+.1f')}%**."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", type=Path, help="map.py reports of one budget, one per seed")
    ap.add_argument("--name", default="tuned_seeds")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    for p in args.reports:
        if not p.is_file():
            raise SmallTalkError(f"{p}: no such map report")
    s = summarise([row_of(p) for p in args.reports])
    write_results(args.results, args.name, s, render(s))
    return 0


if __name__ == "__main__":
    run_main(main)
