"""Baseline mixtures built from another partition of the same run's training data.

The TF-IDF baseline and the random-shard control replace only *how the training data is split*;
everything else must be the run's own: same data, same expert architecture and training budget,
same trainer, same evaluation. So a baseline is a *derived run directory*::

    <run>/analysis/<name>/run/
      run_config.json        the parent's resolved config (same experts, steps, batch, seeds)
      data -> <run>/data     a symlink: the very same token shards
      shards/                the baseline's partition, in the format of routing/sharding.py
      experts/valid_routes.npy   the valid split routed by the baseline's own rule
      experts/expert_{k}/    trained by `smalltalk.run.experts.train_expert`, like the run's experts

`write_partition_shards` writes the expert shards of any (num_train_seqs,) assignment exactly as
the sharding stage does (per-expert prepared-data manifests, domain counts, the per-chunk
assignment file), so `train_expert` and every reader of shards work unchanged.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..data.shards import ShardWriter, token_dtype
from ..errors import SmallTalkError
from ..io import atomic_open, atomic_write_json, read_json
from ..run.layout import RunLayout
from ..data.manifest import read_data_manifest, subset_split, write_subset_manifest
from ..routing.sharding import write_shards_manifest
from .output import analysis_dir
from .runs import RunView, open_run

# Sequences read at a time while writing shards (bounds memory).
_CHUNK = 16384


def write_partition_shards(data_dir: Path, assignment: np.ndarray, out: Path, num_experts: int, *,
                           prefix_len: int, method: dict[str, Any], split: str = "train") -> dict:
    """Write the sequences of `split` to ``<out>/expert_{e}/<split>/`` by `assignment`; returns the manifest."""
    from ..data.splits import load_split

    data_dir, out = Path(data_dir), Path(out)
    data = read_data_manifest(data_dir)
    ds = load_split(data_dir, split).dataset
    assignment = np.asarray(assignment, dtype=np.int64)
    if assignment.shape != (len(ds),):
        raise SmallTalkError(f"assignment has {assignment.shape} entries but split {split!r} of {data_dir} has "
                             f"{len(ds)} sequences")
    if assignment.min() < 0 or assignment.max() >= num_experts:
        raise SmallTalkError(f"assignment uses experts outside [0, {num_experts})")
    counts = np.bincount(assignment, minlength=num_experts)
    if np.any(counts == 0):
        raise SmallTalkError(f"the partition leaves experts {np.flatnonzero(counts == 0).tolist()} without data")
    if out.exists():
        shutil.rmtree(out)  # a partition is rewritten whole: stale shards of another one must not survive
    dtype = token_dtype(ds.vocab_size)
    writers = [ShardWriter(out / f"expert_{e}" / split, ds.seq_len, ds.vocab_size, seqs_per_shard=_CHUNK)
               for e in range(num_experts)]
    domain_names = data.domains
    table = np.zeros((num_experts, max(1, len(domain_names))), dtype=np.int64)
    for start in range(0, len(ds), _CHUNK):
        idx = np.arange(start, min(start + _CHUNK, len(ds)), dtype=np.int64)
        tokens, domains, chunk = ds.get(idx).astype(dtype), ds.domains(idx), assignment[idx]
        for e in range(num_experts):
            sel = chunk == e
            if sel.any():
                writers[e].add(tokens[sel], domains[sel])
        known = domains >= 0
        np.add.at(table, (chunk[known], domains[known].astype(np.int64)), 1)
    for w in writers:
        w.close()
    work = out / "work"
    with atomic_open(work / f"{split}_assign_{0:06d}.npy", "wb") as f:
        np.save(f, assignment.astype(np.int16))

    experts = []
    for e in range(num_experts):
        edir = out / f"expert_{e}"
        per_split = subset_split(edir, split, int(counts[e]), data.splits[split], ds.seq_len,
                                 {d: int(table[e, i]) for i, d in enumerate(domain_names)})
        write_subset_manifest(edir, data, {split: per_split}, e, {"partition": method})
        experts.append({"dir": edir.name, split: int(counts[e])})
    splits = {split: {"num_seqs": len(ds), "num_chunks": 1, "counts": counts.tolist(),
                      "domain_counts": [{d: int(table[e, i]) for i, d in enumerate(domain_names)}
                                        for e in range(num_experts)]}}
    return write_shards_manifest(out, num_experts, prefix_len, len(ds), experts, splits, domain_names,
                                 data.tokenizer_identity(), str(data_dir.resolve()), routing=method)


def derived_run_dir(parent: RunView, name: str) -> Path:
    return analysis_dir(parent.root, name) / "run"


def prepare_derived_run(parent: RunView, name: str, train_assignment: np.ndarray, valid_routes: np.ndarray,
                        method: dict[str, Any]) -> Path:
    """Create (or reuse, when the partition is unchanged) the derived run of the module docstring."""
    root = derived_run_dir(parent, name)
    layout = RunLayout(root)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(layout.config, read_json(parent.layout.config))
    if not layout.data.exists():
        os.symlink(os.path.relpath(parent.data_dir.resolve(), root.resolve()), layout.data)
    assign_file = layout.shards / "work" / "train_assign_000000.npy"
    same = assign_file.is_file() and np.array_equal(np.load(assign_file).astype(np.int64), train_assignment) \
        and layout.shards_manifest.is_file()
    if not same:
        # A new partition invalidates experts trained on the old one.
        shutil.rmtree(root / "experts", ignore_errors=True)
        write_partition_shards(layout.data, train_assignment, layout.shards, parent.num_experts,
                               prefix_len=parent.prefix_len, method=method)
    layout.valid_routes.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(layout.valid_routes, "wb") as f:
        np.save(f, np.asarray(valid_routes, dtype=np.int64))
    return root


def train_derived_experts(root: Path, log: Callable[[str], None] = print, progress: bool | None = False) -> RunView:
    """Train (or resume) every expert of a derived run with the run's own expert trainer."""
    from ..run.experts import train_expert

    view = open_run(root, need_experts=False)
    for k in range(view.num_experts):
        t0 = time.perf_counter()
        summary = train_expert(root, k, cfg=view.config, progress=progress, log=log)
        log(f"{root.parent.name}: expert {k} trained ({summary.get('step')} steps, {time.perf_counter() - t0:.0f}s)")
    return open_run(root)
