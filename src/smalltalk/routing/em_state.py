"""Router EM on disk: what survives an interruption and how a re-run picks up after the last complete iteration.

Files (under ``<run_dir>/routers/``): ``em_config.json`` (settings + data identity, checked when resuming),
``em_state.json`` (last completed iteration, rewritten after each), ``em_log.jsonl`` and ``em_plot.png``,
``work/assign_{i:04d}.npy`` (the assignment of iteration i's sequences; i = 0 is the random start),
``work/probe_assign_{i:04d}.npy`` and ``work/router_{e}/`` (each router's trainer run with its checkpoints).

A worker can be at most one iteration ahead of the saved state (it may finish the next iteration's training
while the main worker is writing), so router checkpoints beyond the next iteration are discarded when
resuming; routers are deterministic, so a resumed run ends exactly where an uninterrupted one does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ..errors import SmallTalkError
from ..io import atomic_open, atomic_write_json, atomic_write_text, read_json
from ..model.config import ModelConfig
from ..train.layout import TrainerDir, read_metrics
from .analysis import plot_em
from .config import RouterEMConfig
from .distributed import Workers

# Config fields that may change when resuming without changing what was already computed.
_RESUMABLE = {"iterations", "device", "score_batch_size", "name"}


class EMState:
    """The routers directory of one EM run, seen by one worker."""

    def __init__(self, out: Path, cfg: RouterEMConfig, workers: Workers):
        self.out, self.work, self.cfg, self.workers = out, out / "work", cfg, workers

    def check_config(self, expected: dict) -> None:
        """Write em_config.json, or check that a resumed run uses the same settings and data."""
        self.work.mkdir(parents=True, exist_ok=True)
        _check_or_write_config(self.out / "em_config.json", expected, self.workers)

    def completed_iterations(self) -> int:
        path = self.out / "em_state.json"
        done = int(read_json(path)["completed_iterations"]) if path.exists() else 0
        if done > self.cfg.iterations:
            raise SmallTalkError(f"{path}: {done} iterations are already done, more than --iterations "
                                 f"{self.cfg.iterations}; raise --iterations or use a new --out")
        return done

    def save_assignment(self, iteration: int, assignment: np.ndarray) -> None:
        if self.workers.is_main:
            _save_npy(self.work / f"assign_{iteration:04d}.npy", assignment)

    def load_assignment(self, iteration: int) -> np.ndarray:
        return _load_npy(self.work / f"assign_{iteration:04d}.npy")

    def probe_assignment(self, iteration: int) -> np.ndarray | None:
        path = self.work / f"probe_assign_{iteration:04d}.npy"
        return np.load(path) if iteration and path.exists() else None

    def log(self, upto: int) -> list[dict]:
        """The per-iteration records of iterations 1..upto (a resumed run logs what it logged before)."""
        return _read_log(self.out / "em_log.jsonl", upto)

    def open_trainers(self, model_cfg: ModelConfig, train, segments: list[np.ndarray], done: int) -> dict:
        """This worker's routers, each a Trainer resumed from its checkpoint (pruned to the resume point)."""
        return _open_trainers(self.work, self.cfg, model_cfg, train, segments, done, self.workers)

    def last_train_loss(self, e: int, step: int) -> float:
        return _last_train_loss(self.work / f"router_{e}", step)

    def save_iteration(self, it: int, assignment: np.ndarray, probe_assign: np.ndarray | None,
                       records: list[dict]) -> None:
        _save_iteration(self.out, it, self.cfg.steps_per_iteration, assignment, probe_assign, records)

    def resume_hint(self) -> str:
        return _resume_hint(self.out, self.cfg)


def _check_or_write_config(path: Path, expected: dict, workers: Workers) -> None:
    if path.exists():
        saved = read_json(path)
        old, new = saved.get("em", {}), expected["em"]
        changed = sorted(k for k in set(old) | set(new) if k not in _RESUMABLE and old.get(k) != new.get(k))
        if changed:
            diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
            raise SmallTalkError(f"{path}: this run was started with other EM settings ({diffs}); use the same "
                                 "settings to resume, or a new --out run directory")
        for key in ("tokenizer_sha256", "train_seqs", "seq_len", "vocab_size"):
            if saved.get("data", {}).get(key) != expected["data"][key]:
                raise SmallTalkError(f"{path}: this run was started on other data ({key}: "
                                     f"{saved.get('data', {}).get(key)!r}, now {expected['data'][key]!r}); resume "
                                     "with the original --data directory or use a new --out run directory")
        if saved.get("router_model") != expected["router_model"]:
            raise SmallTalkError(f"{path}: this run's routers use another model config; use the same "
                                 "--router-preset or a new --out run directory")
        if workers.is_main and saved.get("em", {}).get("iterations") != new.get("iterations"):
            atomic_write_json(path, {**saved, "em": new})
    elif workers.is_main:
        atomic_write_json(path, expected)


def _prune_checkpoints(ckpt_root: Path, max_step: int) -> None:
    """Drop router checkpoints newer than the iteration being resumed (see module docstring)."""
    from ..train.checkpoint import list_checkpoints

    for step, path in list_checkpoints(ckpt_root):
        if step > max_step:
            shutil.rmtree(path, ignore_errors=True)


def _read_log(path: Path, upto: int) -> list[dict]:
    records = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("iteration", 0) <= upto:
                records.append(rec)
    return records


def _last_train_loss(run: Path, step: int) -> float:
    """Router training loss logged at `step` (read back so a resumed iteration logs what it logged before)."""
    for rec in reversed(read_metrics(run)):
        if rec.get("step") == step and "loss" in rec:
            return float(rec["loss"])
    return float("nan")


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array))


def _load_npy(path: Path) -> np.ndarray:
    if not path.exists():
        raise SmallTalkError(f"{path}: missing, but em_state.json says its iteration is complete; the run "
                             "directory is damaged: start over with a new --out")
    return np.load(path, allow_pickle=False)


def _resume_hint(out: Path, cfg: RouterEMConfig) -> str:
    state = out / "em_state.json"
    done = read_json(state)["completed_iterations"] if state.exists() else 0
    return (f"{done} of {cfg.iterations} EM iterations are complete and saved in {out}; re-run the same command "
            "to resume from there")


def _open_trainers(work: Path, cfg: RouterEMConfig, model_cfg: ModelConfig, train, segments: list[np.ndarray],
                   done: int, workers: Workers) -> dict:
    """This worker's routers, each a Trainer resumed from its checkpoint (pruned to the resume point)."""
    from ..train.distributed import DistInfo
    from ..train.trainer import Trainer

    steps = cfg.steps_per_iteration
    trainers = {}
    for e in workers.owned(cfg.num_experts):
        run = work / f"router_{e}"
        _prune_checkpoints(TrainerDir(run).checkpoints, (done + 1) * steps)
        tcfg = cfg.train_config(e).replace(device=str(workers.device))
        # DistInfo(): a router is trained by one process; no data parallelism, no gradient exchange.
        trainers[e] = Trainer(model_cfg, tcfg, train, run, indices=segments[e], dist_info=DistInfo(), progress=False)
        if not done * steps <= trainers[e].step <= (done + 1) * steps:
            raise SmallTalkError(f"{run}: router {e} checkpoint is at step {trainers[e].step}, but EM state says "
                                 f"{done} iterations of {steps} steps are done; the run directory is inconsistent: "
                                 "start over with a new --out")
    return trainers


def _save_iteration(out: Path, it: int, steps: int, assignment: np.ndarray, probe_assign: np.ndarray | None,
                    records: list[dict]) -> None:
    """Assignment files first, the state last: the state only ever names iterations whose files exist."""
    work = out / "work"
    _save_npy(work / f"assign_{it:04d}.npy", assignment)
    if probe_assign is not None:
        _save_npy(work / f"probe_assign_{it:04d}.npy", probe_assign)
    atomic_write_text(out / "em_log.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    atomic_write_json(out / "em_state.json", {"completed_iterations": it, "step": it * steps,
                                              "segment_sizes": records[-1]["segment_sizes"]})
    plot_em(records, out / "em_plot.png")
