"""Router training by EM (paper Algorithm 1 lines 1-10).

    X_0 <- N sequences; random balanced assignment                      (lines 2-3)
    for i = 1..T:
        every router e trains `steps_per_iteration` steps on its segment    (M-step, Eq. 9, lines 5-7)
        X_i <- N new sequences; score with all routers; balanced assignment (E-step, Eq. 4, lines 8-9)

Each router is an ordinary `Trainer` (prefix loss, constant lr after warm-up) whose optimizer state
carries over from one iteration to the next; only its index set changes. Sequences per iteration are
drawn without replacement from a seeded stream of permutations of the train split (a new
permutation only once the split is used up). Under torchrun the routers are spread over workers and
the score matrix is the only thing exchanged (`distributed.py`).

Logged per iteration (`em_log.jsonl`), all on a fixed *probe* set of `heldout_seqs` evenly spaced
valid sequences: each router's mean prefix NLL; the (router x held-out segment) NLL matrix, where
held-out segments come from balanced assignment of the probe scores (so "router e is lowest on its
own segment" is a real test of specialisation); the fraction of probe sequences whose expert changed
since the previous iteration (a fixed probe rather than the previous training batch, so consecutive
iterations compare the same sequences). Also the segment sizes of the new assignment and, when the
data has domains, routing-vs-domain tables with normalised mutual information (analysis only).

On disk (``<run_dir>/routers/``)::

    em_config.json                config + data identity, checked when resuming
    em_state.json                 last completed iteration (rewritten atomically after each)
    em_log.jsonl, em_plot.png     per-iteration log and its plot
    comm.json                     bytes each worker sent / received, beside the App. A.4 estimate
    manifest.json                 written when all iterations are done
    router_{e}/                   final router model directories
    work/router_{e}/              router e's trainer run (checkpoints/, metrics.jsonl)
    work/assign_{i:04d}.npy       assignment of the sequences of iteration i (i = 0: random)
    work/probe_assign_{i:04d}.npy balanced assignment of the probe set after iteration i
    work/comm_rank_{r}.json       cumulative bytes of worker r

Resuming: re-running the same command continues after the last completed iteration. A worker can be
at most one iteration ahead of the saved state (it may finish the next iteration's training while
the main worker is writing), so router checkpoints beyond the next iteration are discarded first;
routers are deterministic, so a resumed run ends exactly where an uninterrupted one does.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import SmallTalkError
from ..io import atomic_open, atomic_write_json, atomic_write_text, read_json
from ..model.config import ModelConfig, preset
from ..data.manifest import read_data_manifest
from .analysis import contingency, nll_by_segment, normalized_mutual_info, plot_em, specialisation
from .assign import assignment_objective, balanced_assignment, random_balanced_assignment, segment_sizes
from .config import RouterEMConfig
from .routers_dir import read_routers_manifest, write_routers_manifest
from .distributed import Workers, init_workers, install_termination_message
from . import rule
from .score import StackedRouters, check_prefix_len, mean_prefix_nll, score_dataset

# Config fields that may change when resuming without changing what was already computed.
_RESUMABLE = {"iterations", "device", "score_batch_size", "name"}


def routers_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "routers"


def sample_iteration_seqs(num_train: int, num_seqs: int, iteration: int, seed: int) -> np.ndarray:
    """The N sequence indices of iteration `iteration` (0 = the initial random batch).

    Epoch k is a seeded permutation of the train split cut into floor(num_train / N) batches; iterations
    take these batches in turn, so no sequence repeats until the split is used up, a batch never holds a
    sequence twice, and any iteration's batch is computed directly (for resuming). The num_train % N
    sequences left over in an epoch land in other batches of later epochs' permutations.
    """
    per_epoch = num_train // num_seqs
    if per_epoch < 1:
        raise SmallTalkError(f"seqs_per_iteration={num_seqs} is more than the train split's {num_train} sequences")
    epoch, k = divmod(iteration, per_epoch)
    perm = np.random.default_rng([seed, 0x5EED, epoch]).permutation(num_train)
    return perm[k * num_seqs:(k + 1) * num_seqs].astype(np.int64)


def segments_of(seqs: np.ndarray, assignment: np.ndarray, num_experts: int, iteration: int) -> list[np.ndarray]:
    """Router e's training indices: the sequences assigned to it. An empty segment is an error (a router
    with nothing to train on would silently stop learning)."""
    sizes = segment_sizes(assignment, num_experts)
    if len(assignment) != len(seqs) or np.any(sizes == 0):
        empty = [int(e) for e in np.flatnonzero(sizes == 0)]
        raise SmallTalkError(f"EM iteration {iteration}: router(s) {empty} got no sequences (segment sizes "
                             f"{sizes.tolist()}, {len(seqs)} sequences); raise --seqs-per-iteration to at least "
                             "--num-experts, or delete the run's routers/work directory if it was edited by hand")
    return [seqs[assignment == e] for e in range(num_experts)]


def _router_model_config(cfg: RouterEMConfig, vocab_size: int, seq_len: int) -> ModelConfig:
    return preset(cfg.router_preset, vocab_size=vocab_size, max_seq_len=seq_len)


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
    path = run / "metrics.jsonl"
    if path.exists():
        for line in reversed(path.read_text(encoding="utf-8").splitlines()):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
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


class _CommCounter:
    """Cumulative bytes of one worker, persisted across resumes in work/comm_rank_{r}.json."""

    def __init__(self, path: Path, workers: Workers):
        self.path, self.workers = path, workers
        self.base = read_json(path) if path.exists() else {"bytes_sent": 0, "bytes_received": 0,
                                                               "routing_bytes_sent": 0, "routing_bytes_received": 0,
                                                               "exchanges": 0}
        self.base["rank"] = workers.rank

    def add(self, sent: int, received: int, routing_fraction: float) -> dict:
        b = self.base
        b["bytes_sent"] += sent
        b["bytes_received"] += received
        b["routing_bytes_sent"] += int(round(sent * routing_fraction))
        b["routing_bytes_received"] += int(round(received * routing_fraction))
        b["exchanges"] += 1
        atomic_write_json(self.path, b)
        return {"bytes_sent": sent, "bytes_received": received}


def train_routers(data_dir: str | Path, run_dir: str | Path, cfg: RouterEMConfig, *, workers: Workers | None = None,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) router EM on a prepared data directory. Returns the routers manifest."""
    from ..locks import DirLock

    workers = workers or init_workers(cfg.device)
    with DirLock(routers_dir(run_dir), "router EM", enabled=workers.is_main):
        return _train_routers(data_dir, run_dir, cfg, workers, log)


def _train_routers(data_dir: str | Path, run_dir: str | Path, cfg: RouterEMConfig, workers: Workers,
                   log: Callable[[str], None] | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    say = log if log is not None else (lambda msg: print(msg, file=sys.stderr, flush=True))
    say = say if workers.is_main else (lambda msg: None)
    out = routers_dir(run_dir)
    work = out / "work"
    E, M, N, steps = cfg.num_experts, cfg.prefix_len, cfg.num_seqs, cfg.steps_per_iteration
    install_termination_message(workers, lambda: _resume_hint(out, cfg))

    train, valid, probe, data_info = _open_data(Path(data_dir), cfg)
    model_cfg = _router_model_config(cfg, train.dataset.vocab_size, train.dataset.seq_len)
    work.mkdir(parents=True, exist_ok=True)
    _check_or_write_config(out / "em_config.json", {"em": cfg.to_dict(), "router_model": model_cfg.to_dict(),
                                                    "data": data_info}, workers)
    done, segments, prev_probe = _resume_point(out, cfg, len(train.dataset), workers)
    records = _read_log(out / "em_log.jsonl", done)
    trainers = _open_trainers(work, cfg, model_cfg, train, segments, done, workers)
    comm = _CommCounter(work / f"comm_rank_{workers.rank}.json", workers)
    say(f"router EM: {cfg.describe()}; world size {workers.world_size}, this worker owns routers {list(trainers)}"
        + (f"; resuming after iteration {done}" if done else ""))

    for it in range(done + 1, cfg.iterations + 1):
        t0 = time.perf_counter()
        for e, trainer in trainers.items():  # M-step (Alg. 1 lines 5-7): no communication at all
            trainer.set_indices(segments[e])
            trainer.train(until_step=it * steps)
        t1 = time.perf_counter()
        new_seqs = sample_iteration_seqs(len(train.dataset), N, it, cfg.seed)  # line 8
        local = _score_local(trainers, work, it * steps, cfg, train, new_seqs, valid, probe, workers)
        t2 = time.perf_counter()
        sent0, recv0 = workers.bytes_sent, workers.bytes_received
        full = workers.all_gather_scores(local, E, cfg.score_dtype)  # (N + num_probe + 1, E): the only exchange
        exchange = comm.add(workers.bytes_sent - sent0, workers.bytes_received - recv0, N / len(local))
        t3 = time.perf_counter()

        num_probe = len(probe)
        scores, probe_scores, train_loss = full[:N], full[N:N + num_probe], full[N + num_probe]
        assignment = balanced_assignment(scores)  # E-step (line 9): every worker computes the same
        segments = segments_of(new_seqs, assignment, E, it)
        probe_assign = balanced_assignment(probe_scores) if num_probe else None
        record = _iteration_record(it, it * steps, E, M, scores, assignment, probe_scores, probe_assign, prev_probe,
                                   train_loss, data_info["domains"], train.dataset.domains(new_seqs),
                                   valid.dataset.domains(probe) if num_probe else None)
        record.update(time_s={"train": t1 - t0, "score": t2 - t1, "exchange": t3 - t2},
                      exchange_bytes=exchange, world_size=workers.world_size)
        prev_probe = probe_assign
        if workers.is_main:
            records.append(record)
            _save_iteration(out, it, steps, assignment, probe_assign, records)
        say(_describe_iteration(record, cfg.iterations, t3 - t0))

    for e, trainer in trainers.items():
        trainer.save_model(out / f"router_{e}")
        shutil.rmtree(work / f"router_{e}" / "model", ignore_errors=True)  # the trainer's own copy
    workers.barrier()
    manifest = None
    if workers.is_main:
        comm_report = write_comm_report(out, cfg, train.dataset.seq_len, workers.world_size, len(records))
        manifest = write_routers_manifest(out, cfg, model_cfg, data_info, records, comm_report,
                                          time.perf_counter() - t_start)
    workers.barrier()
    return manifest if manifest is not None else read_routers_manifest(out).raw


def _resume_hint(out: Path, cfg: RouterEMConfig) -> str:
    state = out / "em_state.json"
    done = read_json(state)["completed_iterations"] if state.exists() else 0
    return (f"{done} of {cfg.iterations} EM iterations are complete and saved in {out}; re-run the same command "
            "to resume from there")


def _open_data(data_dir: Path, cfg: RouterEMConfig):
    """(train split, valid split or None, probe indices, data identity for em_config.json), validated."""
    from ..data.splits import evenly_spaced, load_split

    train = load_split(data_dir, "train")
    valid = load_split(data_dir, "valid") if cfg.heldout_seqs else None
    check_prefix_len(cfg.prefix_len, train.dataset.seq_len, where="prefix_len")
    if cfg.num_seqs > len(train.dataset):
        raise SmallTalkError(f"seqs_per_iteration={cfg.num_seqs} is more than the train split's {len(train.dataset)} "
                             f"sequences ({data_dir}); lower --seqs-per-iteration or --steps-per-iteration / "
                             "--batch-size")
    if train.tokenizer_file is None:
        raise SmallTalkError(f"{data_dir}: no tokenizer file; routers must record their tokenizer. Re-run prepare")
    probe = evenly_spaced(len(valid.dataset), cfg.heldout_seqs) if valid is not None else np.zeros(0, np.int64)
    data_info = {"dir": str(data_dir.resolve()), "tokenizer_sha256": train.tokenizer_sha256,
                 "train_seqs": len(train.dataset), "seq_len": train.dataset.seq_len,
                 "vocab_size": train.dataset.vocab_size,
                 "domains": read_data_manifest(data_dir).domains}
    return train, valid, probe, data_info


def _resume_point(out: Path, cfg: RouterEMConfig, num_train: int, workers: Workers):
    """(completed iterations, the segments to train on next, the probe assignment of the last iteration)."""
    state_path, work = out / "em_state.json", out / "work"
    done = int(read_json(state_path)["completed_iterations"]) if state_path.exists() else 0
    if done > cfg.iterations:
        raise SmallTalkError(f"{state_path}: {done} iterations are already done, more than --iterations "
                             f"{cfg.iterations}; raise --iterations or use a new --out")
    seqs = sample_iteration_seqs(num_train, cfg.num_seqs, done, cfg.seed)
    if done == 0:
        assignment = random_balanced_assignment(cfg.num_seqs, cfg.num_experts, cfg.seed)  # Alg. 1 line 3
        if workers.is_main:
            _save_npy(work / "assign_0000.npy", assignment)
        prev_probe = None
    else:
        assignment = _load_npy(work / f"assign_{done:04d}.npy")
        prev_path = work / f"probe_assign_{done:04d}.npy"
        prev_probe = np.load(prev_path) if prev_path.exists() else None
    return done, segments_of(seqs, assignment, cfg.num_experts, done), prev_probe


def _open_trainers(work: Path, cfg: RouterEMConfig, model_cfg: ModelConfig, train, segments: list[np.ndarray],
                   done: int, workers: Workers) -> dict:
    """This worker's routers, each a Trainer resumed from its checkpoint (pruned to the resume point)."""
    from ..train.distributed import DistInfo
    from ..train.trainer import Trainer

    steps = cfg.steps_per_iteration
    trainers = {}
    for e in workers.owned(cfg.num_experts):
        run = work / f"router_{e}"
        _prune_checkpoints(run / "checkpoints", (done + 1) * steps)
        tcfg = cfg.train_config(e).replace(device=str(workers.device))
        # DistInfo(): a router is trained by one process; no data parallelism, no gradient exchange.
        trainers[e] = Trainer(model_cfg, tcfg, train, run, indices=segments[e], dist_info=DistInfo(), progress=False)
        if not done * steps <= trainers[e].step <= (done + 1) * steps:
            raise SmallTalkError(f"{run}: router {e} checkpoint is at step {trainers[e].step}, but EM state says "
                                 f"{done} iterations of {steps} steps are done; the run directory is inconsistent: "
                                 "start over with a new --out")
    return trainers


def _score_local(trainers: dict, work: Path, step: int, cfg: RouterEMConfig, train, new_seqs: np.ndarray, valid,
                 probe: np.ndarray, workers: Workers) -> np.ndarray:
    """(N + num_probe + 1, routers of this worker): the new sequences' and the probe's prefix scores, and a row
    of training losses."""
    stacked = StackedRouters([t.model for t in trainers.values()], device=workers.device)
    local = [score_dataset(stacked, train.dataset, new_seqs, cfg.prefix_len, cfg.score_batch_size)]  # (N, e)
    if len(probe):
        local.append(score_dataset(stacked, valid.dataset, probe, cfg.prefix_len, cfg.score_batch_size))  # (num_probe, e)
    local.append(np.asarray([[_last_train_loss(work / f"router_{e}", step) for e in trainers]], dtype=np.float32))
    return np.concatenate(local)


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


def _describe_iteration(record: dict, iterations: int, seconds: float) -> str:
    nll = record.get("heldout_nll")
    return (f"EM iteration {record['iteration']}/{iterations}: segments {record['segment_sizes']}"
            + (f", held-out NLL {[round(x, 3) for x in nll]}, changed {record['heldout_changed_fraction']}, "
               f"specialised {record['specialised']}" if nll else "") + f" ({seconds:.1f}s)")


def _iteration_record(it: int, step: int, E: int, M: int, scores: np.ndarray, assignment: np.ndarray,
                      probe_scores: np.ndarray, probe_assign: np.ndarray | None, prev_probe: np.ndarray | None,
                      train_loss: np.ndarray, domain_names: list[str], domains: np.ndarray,
                      probe_domains: np.ndarray | None) -> dict:
    record: dict[str, Any] = {
        "iteration": it, "step": step,
        "segment_sizes": segment_sizes(assignment, E).tolist(),
        "train_loss": [float(x) for x in train_loss],
        # How much balancing overrides each sequence's best router, and the mean score it achieves.
        "argmax_agreement": float(np.mean(assignment == rule.route(scores))),
        "mean_assigned_nll": float(-assignment_objective(scores, assignment) / len(assignment) / (M - 1)),
    }
    if probe_assign is not None:
        nll = mean_prefix_nll(probe_scores, M)  # (num_probe, E)
        matrix = nll_by_segment(nll, probe_assign, E)
        record.update(heldout_nll=[float(x) for x in nll.mean(axis=0)],
                      heldout_segment_sizes=segment_sizes(probe_assign, E).tolist(),
                      heldout_nll_by_segment=[[float(x) for x in row] for row in matrix],
                      heldout_changed_fraction=(float(np.mean(probe_assign != prev_probe))
                                                if prev_probe is not None else None),
                      **specialisation(matrix))
    if domain_names:
        table = contingency(assignment, domains, E, len(domain_names))
        record.update(domain_table=table.tolist(), nmi=normalized_mutual_info(table))
        if probe_domains is not None and probe_assign is not None:
            ptable = contingency(probe_assign, probe_domains, E, len(domain_names))
            record.update(heldout_domain_table=ptable.tolist(), heldout_nmi=normalized_mutual_info(ptable))
    return record


def write_comm_report(out: Path, cfg: RouterEMConfig, seq_len: int, world_size: int, num_comms: int) -> dict:
    """``comm.json``: bytes per worker (summed over resumes) beside the App. A.4 estimate for these settings."""
    from .comm import comm_estimate, tokens_between_comms_for

    ranks = []
    for path in sorted((out / "work").glob("comm_rank_*.json")):
        c = read_json(path)
        if int(c.get("rank", -1)) < world_size:
            ranks.append(c)
    bytes_per_score = 2 if cfg.score_dtype == "float16" else 4
    estimate = comm_estimate(cfg.num_experts, seq_len, tokens_between_comms_for(cfg.num_seqs, cfg.num_experts, seq_len),
                             bytes_per_score, num_comms=max(1, num_comms), world_size=world_size)
    report = {
        "world_size": world_size, "score_dtype": cfg.score_dtype, "exchanges": num_comms,
        "sequences_per_exchange": cfg.num_seqs, "heldout_per_exchange": cfg.heldout_seqs,
        "note": ("bytes are payload bytes of the score all-gather counted as a ring moves them ((P-1) blocks each "
                 "way); routing_bytes_* count only the N routed sequences, the rest is the held-out probe and one "
                 "row of training losses used for logging"),
        "ranks": [{"rank": int(c["rank"]), "bytes_sent": int(c["bytes_sent"]),
                   "bytes_received": int(c["bytes_received"]), "routing_bytes_sent": int(c["routing_bytes_sent"]),
                   "routing_bytes_received": int(c["routing_bytes_received"]), "exchanges": int(c["exchanges"])}
                  for c in sorted(ranks, key=lambda c: int(c["rank"]))],
        "estimate": estimate,
    }
    atomic_write_json(out / "comm.json", report)
    return report
