"""Downstream evaluation of a mixture against its dense baseline, side by side (paper §3.3, App. B).

    result = run_downstream(DownstreamConfig(run_dir="runs/x", tasks=["blimp", "hellaswag", "gsm8k"], limit=200))
    result = run_downstream(DownstreamConfig(bundle="B", dense="D/model", out="somewhere"))

Both models go through lm-evaluation-harness with the same tasks, seeds and limits (the mixture
routes every request by its own prefix, see `lm_eval_model.py`). Written to `out`:

    downstream.json   config, per-task rows, BLiMP summary, win rate, routing counts, timings, load average
    downstream.md     the App. B style table (winner in bold, ties both bold) + routing breakdown
    lm_eval_mixture.json, lm_eval_dense.json   lm-eval's own results (all metrics, configs), each saved when
                                             its side is done and reused by a re-run with the same
                                             model files and settings (a resumed job redoes no finished side)

With a run directory (`smalltalk run` layout, run/layout.py) the bundle is ``<run>/bundle``, the
dense baseline ``<run>/dense/model``, `out` is ``<run>/eval``, and the Markdown is also put into
``<run>/report.md`` as a section between ``<!-- downstream -->`` markers (replaced on re-runs;
`downstream_report.py`).

Task names. ``blimp``, ``hellaswag`` and ``gsm8k`` mean the local copies (``blimp_offline`` = all 67
paradigms, ``hellaswag_offline``, ``gsm8k_offline``; data in $SMALLTALK_EVALS); ``blimp_<paradigm>``
means one local paradigm. Any other name is passed to lm-eval as is (its standard tasks need the Hub).
With ``online=True`` the three short names mean lm-eval's standard tasks instead.

Rows. One row per scored task: each BLiMP paradigm, HellaSwag, GSM8K (the "leaf" tasks), with
the task's primary metric (BLiMP acc, HellaSwag acc_norm, GSM8K exact match of the "#### N"
answer, "strict-match"). Winner: the higher value, "tie" when equal at 4 decimals (the paper's
precision). The paper's headline is the share of tasks where the mixture is better or equal.
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..run.layout import RunLayout
from ..errors import SmallTalkError
from ..io import atomic_write_json, atomic_write_text
from .downstream_report import SIDES, to_markdown, update_report

OFFLINE_TASKS = {"blimp": "blimp_offline", "hellaswag": "hellaswag_offline", "gsm8k": "gsm8k_offline"}
# Primary metric per task family (lm-eval result key), first match wins.
PRIMARY_METRICS = (
    ("blimp", "acc,none"),
    ("hellaswag", "acc_norm,none"),
    ("gsm8k", "exact_match,strict-match"),
    ("", "acc,none"),
    ("", "exact_match,none"),
)
TIE_DECIMALS = 4


@dataclass
class DownstreamConfig:
    run_dir: str | None = None
    """A `smalltalk run` directory: supplies bundle, dense and out when they are not given."""
    bundle: str | None = None
    """Mixture bundle directory (or a run directory holding ``bundle/``)."""
    dense: str | None = None
    """Dense baseline model directory."""
    tasks: list[str] = field(default_factory=lambda: ["blimp", "hellaswag", "gsm8k"])
    limit: int | None = None
    """Items per task (lm-eval ``--limit``); None = all."""
    out: str | None = None
    """Directory for downstream.json / .md (None: nothing written)."""
    prefix_len: int | None = None
    """Routing prefix M-hat (default: the bundle's M)."""
    batch_size: int = 32
    device: str = "auto"
    evals_dir: str | None = None
    """Local eval data (default $SMALLTALK_EVALS or ../shared/evals)."""
    online: bool = False
    """Use lm-eval's standard task names (Hub downloads) for blimp / hellaswag / gsm8k."""
    num_fewshot: int | None = None
    max_gen_toks: int = 256
    empty_context: str = "sequence"
    """Routing of empty-context requests (BLiMP): "sequence" (by the scored text) or "fallback"."""
    seed: int = 1234
    include_path: list[str] = field(default_factory=list)
    """Directories of the user's own lm-eval task YAMLs (our offline tasks are always included)."""
    resume: bool = True
    """Reuse a side's lm-eval results saved in `out` when its model files and these settings are unchanged."""

    def __post_init__(self) -> None:
        if self.run_dir is not None:
            run = Path(self.run_dir)
            if not run.is_dir():
                raise SmallTalkError(f"--run-dir {run}: directory not found")
            layout = RunLayout(run)
            self.bundle = self.bundle or str(layout.bundle)
            self.dense = self.dense or str(layout.dense_model)
            self.out = self.out or str(layout.eval_results.parent)
        if self.bundle is None and self.dense is None:
            raise SmallTalkError("downstream evaluation needs --run-dir, or --bundle and/or --dense")
        if isinstance(self.tasks, str):
            self.tasks = [t for t in self.tasks.split(",") if t.strip()]
        self.tasks = [t.strip() for t in self.tasks]
        if isinstance(self.include_path, str):
            self.include_path = [p for p in self.include_path.split(os.pathsep) if p]
        self.include_path = [str(p) for p in self.include_path]
        for p in self.include_path:
            if not Path(p).is_dir():
                raise SmallTalkError(f"--include-path {p}: directory not found")
        self.tasks = [self._task_from_yaml(t) if t.endswith((".yaml", ".yml")) else t for t in self.tasks]
        if not self.tasks:
            raise SmallTalkError("tasks is empty; give e.g. --tasks blimp,hellaswag,gsm8k")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise SmallTalkError(f"limit={self.limit!r} must be a positive integer (or omitted for all items)")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise SmallTalkError(f"batch_size={self.batch_size!r} must be a positive integer")
        if self.num_fewshot is not None and (not isinstance(self.num_fewshot, int) or self.num_fewshot < 0):
            raise SmallTalkError(f"num_fewshot={self.num_fewshot!r} must be a non-negative integer")
        for name, path in (("bundle", self.bundle), ("dense", self.dense)):
            if path is not None and not Path(path).is_dir():
                raise SmallTalkError(f"--{name} {path}: directory not found")


    def _task_from_yaml(self, path: str) -> str:
        """A task given as its YAML file (as lm-eval's --tasks allows): its folder joins the task path and its
        ``task:`` name is evaluated."""
        import re

        yaml_path = Path(path)
        if not yaml_path.is_file():
            raise SmallTalkError(f"--tasks {path}: task file not found")
        found = re.search(r"^task:\s*['\"]?([^'\"\s#]+)", yaml_path.read_text(encoding="utf-8"), re.M)
        if not found:
            raise SmallTalkError(f"{yaml_path}: no `task:` name in this task file")
        folder = str(yaml_path.parent)
        if folder not in self.include_path:
            self.include_path.append(folder)
        return found.group(1)


def resolve_tasks(names: list[str], online: bool = False) -> list[str]:
    """User task names -> lm-eval task names (see the module docstring)."""
    resolved = []
    for name in names:
        if not online and name in OFFLINE_TASKS:
            resolved.append(OFFLINE_TASKS[name])
        elif not online and name.startswith("blimp_") and not name.startswith("blimp_offline"):
            resolved.append("blimp_offline_" + name[len("blimp_"):])
        else:
            resolved.append(name)
    return list(dict.fromkeys(resolved))


def task_manager(evals_dir: str | None = None, tasks: list[str] | None = None, include_path: list[str] = ()):
    """lm-eval TaskManager over our offline task directory and the user's `include_path`; lm-eval's ~15k
    built-in task configs are indexed too (tens of seconds) only when `tasks` names one that is not ours."""
    from lm_eval.tasks import TaskManager

    from .lm_eval_cli import task_paths

    metadata = {"evals_dir": str(evals_dir)} if evals_dir else None
    paths = [str(p) for p in task_paths(list(include_path))]
    local = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    known = set(local.match_tasks(tasks or []))
    ours = [t for t in tasks or [] if t.startswith(tuple(OFFLINE_TASKS.values())) and t not in known]
    if ours:  # our namespace: no need to index lm-eval's tasks to know these do not exist
        check_tasks(local, tasks)
    if tasks is None or known >= set(tasks):
        return local
    return TaskManager(include_path=paths, metadata=metadata)


def check_tasks(manager, tasks: list[str]) -> None:
    known = set(manager.match_tasks(tasks))
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise SmallTalkError(f"unknown lm-eval task(s) {unknown}; local ones are blimp, hellaswag, gsm8k, "
                             "blimp_<paradigm> (see `python -m smalltalk.evaluation.lm_eval_cli ls tasks`)")


def primary_metric(task: str, metrics: dict) -> str | None:
    for family, key in PRIMARY_METRICS:
        if family in task and key in metrics:
            return key
    return None


def evaluate_side(cfg: DownstreamConfig, side: str, tasks: list[str], manager) -> dict:
    """Run lm-eval for one side; returns {"results", "groups", "group_subtasks", "n_samples", "routing", ...}."""
    from lm_eval import simple_evaluate

    from .lm_eval_model import SmallTalkLM

    kwargs = ({"bundle": cfg.bundle, "prefix_len": cfg.prefix_len, "empty_context": cfg.empty_context}
              if side == "mixture" else {"model": cfg.dense})
    start = time.time()
    lm = SmallTalkLM(**kwargs, batch_size=cfg.batch_size, device=cfg.device, max_gen_toks=cfg.max_gen_toks,
                     seed=cfg.seed)
    out = simple_evaluate(model=lm, tasks=tasks, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                          task_manager=manager, random_seed=cfg.seed, numpy_random_seed=cfg.seed,
                          torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed, log_samples=False)
    result = {
        "model": lm.get_model_info(),
        "results": out["results"],
        "groups": out.get("groups", {}),
        "group_subtasks": out.get("group_subtasks", {}),
        "n_samples": out.get("n-samples", {}),
        "configs": out.get("configs", {}),
        "routing": {task: {int(e): n for e, n in sorted(c.items())} for task, c in lm.routing_counts.items()},
        "seconds": round(time.time() - start, 2),
    }
    del lm
    gc.collect()
    return json.loads(json.dumps(result, default=_plain))  # numpy scalars -> plain JSON numbers


def _plain(value: Any):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def leaf_tasks(side: dict) -> list[str]:
    groups = set(side["group_subtasks"])
    return [t for t in side["results"] if t not in groups]


def compare(sides: dict[str, dict]) -> dict:
    """Rows, BLiMP summary, win rate and routing breakdown from the per-side lm-eval outputs."""
    present = [s for s in SIDES if s in sides]
    tasks = list(dict.fromkeys(t for s in present for t in leaf_tasks(sides[s])))
    rows = []
    for task in tasks:
        row: dict[str, Any] = {"task": task, "metric": None, "n": None}
        for s in present:
            metrics = sides[s]["results"].get(task, {})
            key = row["metric"] or primary_metric(task, metrics)
            row["metric"] = key
            if key is None or key not in metrics:
                row[s], row[f"{s}_stderr"] = None, None
                continue
            name, _, filt = key.partition(",")
            row[s] = float(metrics[key])
            stderr = metrics.get(f"{name}_stderr,{filt}")
            row[f"{s}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else None
            row["n"] = (sides[s]["n_samples"].get(task) or {}).get("effective", row["n"])
        row["winner"] = _winner(row.get("mixture"), row.get("dense"))
        rows.append(row)
    summary = _win_summary(rows)
    blimp_rows = [r for r in rows if r["task"].startswith("blimp")]
    blimp = None
    if blimp_rows:
        blimp = {"paradigms": len(blimp_rows), **_win_summary(blimp_rows)}
        for s in present:
            values = [r[s] for r in blimp_rows if r.get(s) is not None]
            blimp[f"{s}_mean"] = sum(values) / len(values) if values else None
    routing = _routing_table(sides.get("mixture"))
    return {"rows": rows, "summary": summary, "blimp": blimp, "routing": routing}


def _winner(mixture: float | None, dense: float | None) -> str | None:
    if mixture is None or dense is None:
        return None
    a, b = round(mixture, TIE_DECIMALS), round(dense, TIE_DECIMALS)
    return "tie" if a == b else ("mixture" if a > b else "dense")


def _win_summary(rows: list[dict]) -> dict:
    counts = Counter(r["winner"] for r in rows if r["winner"] is not None)
    n = sum(counts.values())
    return {"tasks": n, "mixture_better": counts["mixture"], "ties": counts["tie"], "dense_better": counts["dense"],
            "better_or_equal_rate": (counts["mixture"] + counts["tie"]) / n if n else None}


def _routing_table(mixture: dict | None) -> dict | None:
    """Requests per expert for each task, plus all BLiMP paradigms together."""
    if mixture is None:
        return None
    per_task = {t: {str(e): n for e, n in c.items()} for t, c in mixture["routing"].items()}
    blimp = Counter()
    for t, c in per_task.items():
        if t.startswith("blimp"):
            blimp.update(c)
    if sum(t.startswith("blimp") for t in per_task) > 1:
        per_task["blimp (all paradigms)"] = dict(sorted(blimp.items(), key=lambda kv: int(kv[0])))
    return {"num_experts": mixture["model"]["smalltalk"]["num_experts"], "requests": per_task}


def side_key(cfg: DownstreamConfig, side: str, tasks: list[str]) -> dict:
    """Everything one side's lm-eval results depend on: the model's files (path, size, mtime) and the settings.
    A re-run reuses a side's saved results only when this is unchanged."""
    path = Path(cfg.bundle if side == "mixture" else cfg.dense).resolve()
    files = sorted((str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns)
                   for f in path.rglob("*") if f.is_file() and not f.name.startswith(".smalltalk.lock"))
    key = {"side": side, "model": str(path), "files": [list(f) for f in files], "tasks": tasks, "limit": cfg.limit,
           "num_fewshot": cfg.num_fewshot, "max_gen_toks": cfg.max_gen_toks, "seed": cfg.seed,
           "batch_size": cfg.batch_size, "device": cfg.device, "online": cfg.online,
           "evals_dir": None if cfg.online else str(_evals_dir(cfg)), "include_path": cfg.include_path}
    if side == "mixture":
        key.update(prefix_len=cfg.prefix_len, empty_context=cfg.empty_context)
    return key


def _evals_dir(cfg: DownstreamConfig) -> Path:
    from .task_data import resolve_evals_dir

    return resolve_evals_dir(cfg.evals_dir).resolve()


def saved_side(path: Path, key: dict) -> dict | None:
    """The side saved at `path` by an earlier run with the same `key`, else None (missing, unreadable or stale)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("key") == key and "results" in data else None


def run_downstream(cfg: DownstreamConfig, log=lambda msg: None) -> dict:
    """Evaluate both sides, compare, and write the report files into ``cfg.out`` (when set).

    Each side's lm-eval output is saved to ``out/lm_eval_<side>.json`` as soon as it is done, so a run cut off
    during the dense side keeps the mixture's; a re-run reuses a saved side whose model files and settings are
    unchanged (``cfg.resume``, on by default)."""
    import lm_eval

    if not cfg.online:
        # The local tasks never need the network; make sure nothing else in lm-eval / datasets tries.
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tasks = resolve_tasks(cfg.tasks, cfg.online)
    manager = task_manager(cfg.evals_dir, tasks, cfg.include_path)
    check_tasks(manager, tasks)
    if not cfg.online:
        _evals_dir(cfg)  # fail now with a clear message, not inside lm-eval
    out = Path(cfg.out) if cfg.out else None
    sides, reused = {}, []
    for side, path in (("mixture", cfg.bundle), ("dense", cfg.dense)):
        if path is None:
            continue
        key = side_key(cfg, side, tasks)
        side_file = out / f"lm_eval_{side}.json" if out is not None else None
        saved = saved_side(side_file, key) if side_file is not None and cfg.resume else None
        if saved is not None:
            log(f"{side}: reusing {side_file} (same model files and settings; --fresh to evaluate again)")
            sides[side] = saved
            reused.append(side)
            continue
        sides[side] = {**evaluate_side(cfg, side, tasks, manager), "key": key}
        if side_file is not None:
            atomic_write_json(side_file, sides[side])
    mixture_info = sides.get("mixture", {}).get("model", {}).get("smalltalk", {})
    report = {
        "config": asdict(cfg),
        "lm_eval_tasks": tasks,
        "lm_eval_version": lm_eval.__version__,
        "prefix_len": mixture_info.get("prefix_len"),
        "comparison": compare(sides),
        "seconds": {side: sides[side]["seconds"] for side in sides},
        "reused": reused,
        "loadavg": list(os.getloadavg()),
    }
    if out is not None:
        atomic_write_json(out / "downstream.json", report)
        markdown = to_markdown(report)
        atomic_write_text(out / "downstream.md", markdown)
        if cfg.run_dir is not None:
            update_report(Path(cfg.run_dir) / "report.md", markdown)
    return report
