"""Measured points for the law: the map benchmark's results and finished `smalltalk run` directories."""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import SmallTalkError
from ..io import read_json
from .law import Point


def points_of_map(report: dict, source: str) -> list[Point]:
    """Every budget of a `benchmarks/map.py` result: the tuned pair, and each split fraction."""
    out = []
    N, E = int(report["params"]), int(report["num_experts"])
    for b in report["budgets"]:
        dense = math.log(b["dense_ppl"])
        out.append(Point(N, int(b["tokens"]), E, dense, math.log(b["mixture_ppl"]), 0.0, source))
        out += [Point(N, int(b["tokens"]), E, dense, math.log(s["mixture_ppl"]), float(s["fraction"]), source)
                for s in b.get("split", [])]
    return out


def point_of_run(run_dir: Path) -> Point:
    """A finished run's mixture-vs-dense comparison (its dense is whichever its config trained: tune it for a fair
    fit)."""
    from ..data.manifest import read_data_manifest
    from ..run.config import RunConfig
    from ..run.layout import RunLayout

    layout = RunLayout(run_dir)
    if not layout.results.is_file():
        raise SmallTalkError(f"--fit {run_dir}: not a finished run (no {layout.results.name}); finish it with "
                             "`smalltalk run` or leave it out")
    results = read_json(layout.results)
    cfg = RunConfig.from_dict(results["config"])
    data = read_data_manifest(layout.data)
    model = cfg.expert_model.replace(vocab_size=data.vocab_size, max_seq_len=data.seq_len)
    dense = cfg.dense_train()
    ev = results["eval"]
    return Point(model.num_params(), dense.max_steps * dense.batch_size * (data.seq_len - 1), cfg.num_experts,
                 math.log(ev["dense"]["ppl"]), math.log(ev["mixture"]["ppl"]), float(cfg.seed_fraction), str(run_dir))


def read_points(paths: list[str | Path]) -> list[Point]:
    """Points from run directories and map result files (``map_*.json``)."""
    out = []
    for path in map(Path, paths):
        if path.is_file() and path.suffix == ".json":
            report = read_json(path)
            if "budgets" not in report:
                raise SmallTalkError(f"--fit {path}: not a map result (no `budgets`); give run directories or "
                                     "benchmarks/results/map_*.json")
            out += points_of_map(report, str(path))
        elif path.is_dir():
            out.append(point_of_run(path))
        else:
            raise SmallTalkError(f"--fit {path}: no such run directory or map result file")
    return out
