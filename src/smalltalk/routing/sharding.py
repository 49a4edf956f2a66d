"""Shard a token dataset into E expert datasets with trained routers (paper Algorithm 1 lines 12-13).

The split is cut into chunks of `chunk_size` sequences drawn by a seeded permutation (`chunk_order`);
each chunk is scored by all E routers on its M-token prefixes and balanced-assigned exactly as during
router training, and its sequences are appended (in their original relative order, with their domain
ids) to the experts' datasets. Chunks are independent, so workers under torchrun take chunks
``c % world_size == rank`` with no communication, memory is bounded by one chunk, and an interrupted
run resumes chunk by chunk.

Why permuted chunks: prepared data is in corpus order, often one source after another. A consecutive
chunk then holds one or two domains, and balancing it (every expert filled to capacity) spreads each
domain evenly over all experts, which undoes the routers' specialisation (measured at cpu scale:
NMI(expert, domain) of the training partition 0.10 with consecutive chunks). A random chunk is a
sample of the whole split, so per-chunk balancing approximates one balanced assignment of everything.

Output (``<out>/``)::

    manifest.json                       counts per expert and per domain, router + tokenizer sha256
    shard_config.json                   what the shards were made from (checked when resuming)
    expert_{e}/manifest.json            a prepared-data manifest: `smalltalk train --data <out>/expert_{e}`
    expert_{e}/tokenizer.json
    expert_{e}/<split>/shard_{c:05d}.bin  the sequences of chunk c routed to expert e
    work/<split>_chunk_{c:06d}.json     chunk c is complete (counts), written after its shards
    work/<split>_index_{c:06d}.npy      the split's sequence indices in chunk c (sorted, int64)
    work/<split>_assign_{c:06d}.npy     expert of each of those sequences (int16); `load_assignment` joins them
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..data.manifest import DataManifest, read_data_manifest, subset_split, write_subset_manifest
from ..data.shards import ShardWriter
from ..errors import SmallTalkError
from ..io import atomic_open, atomic_write_json, read_json, read_manifest
from ..model.io import sha256_file
from .analysis import contingency
from .assign import balanced_assignment, segment_sizes
from .distributed import Workers, init_workers
from .routers_dir import MANIFEST as ROUTERS_MANIFEST, load_routers, read_routers_manifest
from .score import StackedRouters, check_prefix_len, score_dataset

MANIFEST_FORMAT, SHARDS_MANIFEST = "smalltalk-expert-shards", "manifest.json"


def expert_shard_dir(out: str | Path, e: int) -> Path:
    """Expert e's dataset (a prepared-data directory) inside an expert-shards directory."""
    return Path(out) / f"expert_{e}"


@dataclass(frozen=True)
class ShardsManifest:
    """The expert-shards manifest ``<out>/manifest.json``, read and checked (`read_shards_manifest`)."""

    dir: Path
    num_experts: int
    prefix_len: int
    tokenizer_sha256: str | None
    routers_dir: str | None
    """The routers that routed the data (None for the partition of a derived analysis run)."""
    routers_weights_sha256: list[str] | None
    train_counts: list[int]
    """Training sequences of each expert."""
    train_num_seqs: int

    @property
    def path(self) -> Path:
        return self.dir / SHARDS_MANIFEST

    def expert_dir(self, e: int) -> Path:
        return expert_shard_dir(self.dir, e)


def read_shards_manifest(directory: str | Path) -> ShardsManifest:
    """Read ``<directory>/manifest.json`` written by the shard stage; errors name the file and what to do."""
    directory = Path(directory)
    path = directory / SHARDS_MANIFEST
    raw = read_manifest(path, MANIFEST_FORMAT, "an expert-shards manifest",
                        "pass the shards/ directory written by `smalltalk shard`",
                        missing=f"{path}: not found; shard the data first (`smalltalk run --config ... --until shard` "
                                "or `smalltalk shard`)")
    try:
        train = raw["splits"]["train"]
        routers = raw.get("routers") or {}
        return ShardsManifest(directory, int(raw["num_experts"]), int(raw["prefix_len"]), raw.get("tokenizer_sha256"),
                              routers.get("dir"), routers.get("weights_sha256"), [int(c) for c in train["counts"]],
                              int(train["num_seqs"]))
    except (KeyError, TypeError, ValueError) as e:
        raise SmallTalkError(f"{path}: expert-shards manifest lacks or garbles {e}; shard the data again") from None


def chunk_order(num_seqs: int, seed: int) -> np.ndarray:
    """(num_seqs,) seeded permutation of a split; chunk c is ``sorted(order[c * size:(c + 1) * size])``."""
    return np.random.default_rng([seed, 0x5AAD]).permutation(num_seqs)


def chunk_indices(order: np.ndarray, c: int, chunk_size: int) -> np.ndarray:
    """Sequence indices of chunk c, ascending (memmap reads stay forward, expert shards keep corpus order)."""
    return np.sort(order[c * chunk_size:(c + 1) * chunk_size]).astype(np.int64)


def load_assignment(shards_dir: str | Path, split: str = "train") -> np.ndarray:
    """(num_seqs,) expert of every sequence of `split`, in the split's order, from the per-chunk work files.

    Shards written before chunks were permuted (and derived runs' single-file partitions) have no index
    files: their chunks are consecutive.
    """
    work = Path(shards_dir) / "work"
    files = sorted(work.glob(f"{split}_assign_*.npy"))
    if not files:
        raise SmallTalkError(f"{work}: no {split}_assign_*.npy files; shard the data first")
    parts = [np.load(f).astype(np.int64) for f in files]
    index_files = [f.with_name(f.name.replace("_assign_", "_index_")) for f in files]
    if not all(f.is_file() for f in index_files):
        return np.concatenate(parts)
    indices = [np.load(f) for f in index_files]
    out = np.full(sum(len(i) for i in indices), -1, dtype=np.int64)
    for idx, part in zip(indices, parts):
        out[idx] = part
    if (out < 0).any():
        raise SmallTalkError(f"{work}: the {split} chunks do not cover every sequence; shard the data again")
    return out


def _chunk_done(work: Path, split: str, c: int) -> Path:
    return work / f"{split}_chunk_{c:06d}.json"


def shard_dataset(data_dir: str | Path, routers: str | Path, out: str | Path, *, chunk_size: int | None = None,
                  splits: Sequence[str] = ("train",), batch_size: int = 32, device: str = "cpu",
                  seed: int | None = None, workers: Workers | None = None,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Route every sequence of `splits` to one of the E experts; returns the output manifest (see module doc).

    `chunk_size` defaults to the N sequences per iteration the routers were trained with; `seed` (which
    sequences share a chunk) to the routers' EM seed.
    """
    from ..locks import DirLock

    workers = workers or init_workers(device)
    with DirLock(out, "sharding", enabled=workers.is_main):
        return _shard_dataset(data_dir, routers, out, chunk_size=chunk_size, splits=splits, batch_size=batch_size,
                              seed=seed, workers=workers, log=log)


def _shard_dataset(data_dir, routers, out, *, chunk_size, splits, batch_size, seed, workers: Workers,
                   log) -> dict[str, Any]:
    from ..data.splits import load_split

    t_start = time.perf_counter()
    say = log if log is not None else (lambda msg: print(msg, file=sys.stderr, flush=True))
    say = say if workers.is_main else (lambda msg: None)
    data_dir, routers, out = Path(data_dir), Path(routers), Path(out)

    data = read_data_manifest(data_dir)
    models, rmanifest = load_routers(routers, device=str(workers.device))
    E, M = int(rmanifest["num_experts"]), int(rmanifest["prefix_len"])
    data_sha = data.tokenizer_identity()
    if data_sha != rmanifest.get("tokenizer_sha256"):
        raise SmallTalkError(f"{routers}: routers were trained with tokenizer sha256 "
                             f"{str(rmanifest.get('tokenizer_sha256'))[:12]}, but {data_dir} uses "
                             f"{str(data_sha)[:12]}; shard data prepared with the routers' tokenizer, or train "
                             "routers on this data")
    em = read_routers_manifest(routers).em
    chunk_size = int(chunk_size or em.num_seqs)
    if chunk_size < E:
        raise SmallTalkError(f"chunk_size={chunk_size} is smaller than the {E} experts: balanced assignment could "
                             "leave experts empty; use --chunk-size >= --num-experts")
    seed = int(em.seed if seed is None else seed)
    domain_names = data.domains
    router_weights = [r["weights_sha256"] for r in rmanifest["routers"]]
    settings = {"data_dir": str(data_dir.resolve()), "routers_dir": str(routers.resolve()),
                "routers_sha256": hashlib.sha256("".join(router_weights).encode()).hexdigest(),
                "tokenizer_sha256": data_sha, "num_experts": E, "prefix_len": M, "chunk_size": chunk_size,
                "chunk_order": "seeded-permutation", "seed": seed, "splits": list(splits)}
    cfg_path = out / "shard_config.json"
    if cfg_path.exists():
        saved = read_json(cfg_path)
        changed = sorted(k for k in settings if k not in ("data_dir", "routers_dir") and saved.get(k) != settings[k])
        if changed:
            raise SmallTalkError(f"{cfg_path}: {out} holds shards made with other settings ({', '.join(changed)}); "
                                 "use a new --out or delete it")
    elif workers.is_main:
        atomic_write_json(cfg_path, settings)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)

    stacked = StackedRouters(models, device=workers.device)
    del models
    for split in splits:
        ds = load_split(data_dir, split).dataset
        check_prefix_len(M, ds.seq_len, stacked.config.max_seq_len, where="routers' prefix_len")
        num_chunks = -(-len(ds) // chunk_size)
        order = chunk_order(len(ds), seed)  # (n,) same on every worker: chunks need no communication
        mine = range(workers.rank, num_chunks, workers.world_size)  # chunk c belongs to rank c % world_size
        todo = [c for c in mine if not _chunk_done(work, split, c).exists()]
        say(f"shard {split}: {len(ds)} sequences in {num_chunks} chunks of {chunk_size} over "
            f"{workers.world_size} worker(s); {len(todo)} chunks to do on worker 0")
        for c in todo:
            counts = _shard_chunk(stacked, ds, split, c, chunk_indices(order, c, chunk_size), M, batch_size, out,
                                  len(domain_names))
            say(f"shard {split}: chunk {c + 1}/{num_chunks} -> {counts}")
    workers.barrier()
    manifest = None
    if workers.is_main:
        manifest = _write_manifests(out, data, rmanifest, routers, settings, domain_names,
                                    time.perf_counter() - t_start)
    workers.barrier()
    return manifest if manifest is not None else read_json(out / SHARDS_MANIFEST)


def _shard_chunk(stacked: StackedRouters, ds, split: str, c: int, idx: np.ndarray, prefix_len: int, batch_size: int,
                 out: Path, num_domains: int) -> list[int]:
    """Score, balance-assign and write chunk c (sequences `idx`) of a split (Alg. 1 lines 12-13); the marker file
    is written last."""
    t0 = time.perf_counter()
    E = stacked.num_routers
    assignment = balanced_assignment(score_dataset(stacked, ds, idx, prefix_len, batch_size))  # (n,)
    domains = ds.domains(idx)  # carried along into the expert shards (analysis metadata, not used to route)
    for e in range(E):
        mine = assignment == e
        if mine.any():  # ascending index order; shard_{c} in every expert directory holds chunk c
            writer = ShardWriter(expert_shard_dir(out, e) / split, ds.seq_len, ds.vocab_size, seqs_per_shard=len(idx),
                                 start_shard=c)
            writer.add(ds.get(idx[mine]), domains[mine])
            writer.close()
    with atomic_open(out / "work" / f"{split}_index_{c:06d}.npy", "wb") as f:
        np.save(f, idx)
    with atomic_open(out / "work" / f"{split}_assign_{c:06d}.npy", "wb") as f:
        np.save(f, assignment.astype(np.int16))
    counts = segment_sizes(assignment, E).tolist()
    atomic_write_json(_chunk_done(out / "work", split, c), {
        "chunk": c, "first": int(idx[0]), "num_seqs": len(idx), "counts": counts,
        "domain_counts": contingency(assignment, domains, E, max(1, num_domains)).tolist(),
        "seconds": time.perf_counter() - t0})
    return counts


def _write_manifests(out: Path, data: DataManifest, rmanifest: dict, routers: Path, settings: dict,
                     domain_names: list[str], elapsed: float) -> dict:
    E = settings["num_experts"]
    splits_out: dict[str, Any] = {}
    per_expert: list[dict[str, Any]] = [{} for _ in range(E)]
    for split in settings["splits"]:
        src = data.splits[split]
        num_chunks = -(-int(src["num_seqs"]) // settings["chunk_size"])
        counts = np.zeros(E, dtype=np.int64)
        dom = np.zeros((E, max(1, len(domain_names))), dtype=np.int64)
        for c in range(num_chunks):
            path = _chunk_done(out / "work", split, c)
            if not path.exists():
                raise SmallTalkError(f"{path}: chunk {c} of split {split!r} is missing after all workers finished; "
                                     "re-run the same command to complete it")
            rec = read_json(path)
            counts += np.asarray(rec["counts"])
            dom += np.asarray(rec["domain_counts"])
        if int(counts.sum()) != int(src["num_seqs"]):
            raise SmallTalkError(f"{out}: split {split!r} has {int(counts.sum())} sharded sequences but the data has "
                                 f"{src['num_seqs']}; delete {out} and shard again")
        splits_out[split] = {"num_seqs": int(counts.sum()), "num_chunks": num_chunks,
                             "counts": counts.tolist(),
                             "domain_counts": [{d: int(dom[e, i]) for i, d in enumerate(domain_names)}
                                               for e in range(E)]}
        for e in range(E):
            per_expert[e][split] = subset_split(expert_shard_dir(out, e), split, int(counts[e]), src, data.seq_len,
                                                {d: int(dom[e, i]) for i, d in enumerate(domain_names)})
    experts = []
    for e in range(E):
        edir = expert_shard_dir(out, e)
        write_subset_manifest(edir, data, per_expert[e], e, {"shard": settings})
        experts.append({"dir": edir.name, **{s: per_expert[e][s]["num_seqs"] for s in settings["splits"]}})
    return write_shards_manifest(out, E, settings["prefix_len"], settings["chunk_size"], experts, splits_out,
                                 domain_names, settings["tokenizer_sha256"], settings["data_dir"],
                                 routers={"dir": str(routers.resolve()),
                                          "weights_sha256": [r["weights_sha256"] for r in rmanifest["routers"]],
                                          "manifest_sha256": sha256_file(routers / ROUTERS_MANIFEST)},
                                 elapsed_s=elapsed, torch_threads=torch.get_num_threads())


def write_shards_manifest(out: Path, num_experts: int, prefix_len: int, chunk_size: int, experts: list[dict],
                          splits: dict, domains: list[str], tokenizer_sha256: str | None, data_dir: str,
                          **provenance: Any) -> dict:
    """Write (last) and return the expert-shards manifest ``<out>/manifest.json``: per expert its directory and
    sequence counts, per split the routing's counts and domain table, and where the shards came from
    (`provenance`: the routers, or the partition method of a derived run)."""
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "num_experts": num_experts, "prefix_len": int(prefix_len),
                "chunk_size": chunk_size, "experts": experts, "splits": splits, "domains": list(domains),
                **provenance, "tokenizer_sha256": tokenizer_sha256, "data_dir": data_dir}
    atomic_write_json(out / SHARDS_MANIFEST, manifest)
    return manifest
