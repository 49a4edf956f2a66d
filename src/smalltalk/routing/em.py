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

This module is the loop, in the order of Algorithm 1; beside it: `em_state.py` (resume and the files of
``<run_dir>/routers/``), `em_log.py` (what each iteration logs), `comm.py` (bytes exchanged),
`routers_dir.py` (the finished routers: manifest, reader, loader). Each iteration is logged on a fixed probe
set of held-out sequences (`em_log.py` says what). Re-running the same command continues after the last
completed iteration.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..data.manifest import read_data_manifest
from ..errors import SmallTalkError
from ..model.config import ModelConfig, preset
from .assign import balanced_assignment, random_balanced_assignment, segment_sizes
from .comm import CommCounter, write_comm_report
from .config import RouterEMConfig
from .distributed import Workers, init_workers, install_termination_message
from .em_log import describe_iteration, iteration_record
from .em_state import EMState
from ..train.layout import TrainerDir
from .routers_dir import read_routers_manifest, router_dir, routers_dir, write_routers_manifest
from .score import StackedRouters, check_prefix_len, score_dataset


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
    E, M, N, steps = cfg.num_experts, cfg.prefix_len, cfg.num_seqs, cfg.steps_per_iteration
    state = EMState(out, cfg, workers)
    install_termination_message(workers, state.resume_hint)

    train, valid, probe, data_info = _open_data(Path(data_dir), cfg)  # line 1: the training sequences
    model_cfg = _router_model_config(cfg, train.dataset.vocab_size, train.dataset.seq_len)
    state.check_config({"em": cfg.to_dict(), "router_model": model_cfg.to_dict(), "data": data_info})
    done = state.completed_iterations()
    seqs = sample_iteration_seqs(len(train.dataset), N, done, cfg.seed)  # line 2: X_0 (or the resumed batch)
    if done == 0:
        assignment = random_balanced_assignment(N, E, cfg.seed)  # line 3: random balanced initial assignment
        state.save_assignment(0, assignment)
    else:
        assignment = state.load_assignment(done)
    segments = segments_of(seqs, assignment, E, done)
    prev_probe, records = state.probe_assignment(done), state.log(done)
    trainers = state.open_trainers(model_cfg, train, segments, done)
    comm = CommCounter(out / "work" / f"comm_rank_{workers.rank}.json", workers)
    say(f"router EM: {cfg.describe()}; world size {workers.world_size}, this worker owns routers {list(trainers)}"
        + (f"; resuming after iteration {done}" if done else ""))

    for it in range(done + 1, cfg.iterations + 1):  # line 4
        t0 = time.perf_counter()
        for e, trainer in trainers.items():  # lines 5-7, M-step (Eq. 9): no communication at all
            trainer.set_indices(segments[e])
            trainer.train(until_step=it * steps)
        t1 = time.perf_counter()
        new_seqs = sample_iteration_seqs(len(train.dataset), N, it, cfg.seed)  # line 8: X_i
        local = _score_local(trainers, state, it * steps, cfg, train, new_seqs, valid, probe, workers)
        t2 = time.perf_counter()
        sent0, recv0 = workers.bytes_sent, workers.bytes_received
        full = workers.all_gather_scores(local, E, cfg.score_dtype)  # (N + num_probe + 1, E): the only exchange
        exchange = comm.add(workers.bytes_sent - sent0, workers.bytes_received - recv0, N / len(local))
        t3 = time.perf_counter()

        num_probe = len(probe)
        scores, probe_scores, train_loss = full[:N], full[N:N + num_probe], full[N + num_probe]
        assignment = balanced_assignment(scores)  # line 9, E-step (Eq. 4): every worker computes the same
        segments = segments_of(new_seqs, assignment, E, it)
        probe_assign = balanced_assignment(probe_scores) if num_probe else None
        record = iteration_record(it, it * steps, E, M, scores, assignment, probe_scores, probe_assign, prev_probe,
                                  train_loss, data_info["domains"], train.dataset.domains(new_seqs),
                                  valid.dataset.domains(probe) if num_probe else None)
        record.update(time_s={"train": t1 - t0, "score": t2 - t1, "exchange": t3 - t2},
                      exchange_bytes=exchange, world_size=workers.world_size)
        prev_probe = probe_assign
        if workers.is_main:
            records.append(record)
            state.save_iteration(it, assignment, probe_assign, records)
        say(describe_iteration(record, cfg.iterations, t3 - t0))

    for e, trainer in trainers.items():  # line 10: the trained routers
        trainer.save_model(router_dir(out, e))
        shutil.rmtree(TrainerDir(out / "work" / f"router_{e}").model, ignore_errors=True)  # the trainer's own copy
    workers.barrier()
    manifest = None
    if workers.is_main:
        comm_report = write_comm_report(out, cfg, train.dataset.seq_len, workers.world_size, len(records))
        manifest = write_routers_manifest(out, cfg, model_cfg, data_info, records, comm_report,
                                          time.perf_counter() - t_start)
    workers.barrier()
    return manifest if manifest is not None else read_routers_manifest(out).raw


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


def _router_model_config(cfg: RouterEMConfig, vocab_size: int, seq_len: int) -> ModelConfig:
    return preset(cfg.router_preset, vocab_size=vocab_size, max_seq_len=seq_len)


def _score_local(trainers: dict, state: EMState, step: int, cfg: RouterEMConfig, train, new_seqs: np.ndarray, valid,
                 probe: np.ndarray, workers: Workers) -> np.ndarray:
    """(N + num_probe + 1, routers of this worker): the new sequences' and the probe's prefix scores, and a row
    of training losses."""
    stacked = StackedRouters([t.model for t in trainers.values()], device=workers.device)
    local = [score_dataset(stacked, train.dataset, new_seqs, cfg.prefix_len, cfg.score_batch_size)]  # (N, e)
    if len(probe):
        local.append(score_dataset(stacked, valid.dataset, probe, cfg.prefix_len, cfg.score_batch_size))  # (num_probe, e)
    local.append(np.asarray([[state.last_train_loss(e, step) for e in trainers]], dtype=np.float32))
    return np.concatenate(local)
