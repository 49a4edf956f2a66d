"""Independent expert training (paper Algorithm 1, lines 14-16).

Expert k reads only its own shard, ``<run>/shards/expert_{k}/train/``, and the run's configuration;
nothing from the other experts and no process group spanning experts. So the E experts can run

* one after another in one process (`smalltalk run`, or a loop over `smalltalk train-expert`),
* as E processes on one machine (``smalltalk train-expert --run R --expert k &`` for each k),
* as E jobs on E machines that share (or copy) the run directory (SLURM job array, see
  docs/running-experts.md), each possibly using several GPUs through ``torchrun`` (DDP within one
  expert only).

Each expert is an ordinary resumable `Trainer` run in ``<run>/experts/expert_{k}/`` (checkpoints,
metrics.jsonl, final ``model/``, ``run.json`` once finished): re-running the same command resumes it.

Validation during training uses the expert's own segment of the valid split: of `valid_seqs`
evenly spaced valid sequences, those the routers send to it (argmax of prefix scores, as at
inference). The routes are computed once and cached in ``<run>/experts/valid_routes.npy``
(deterministic and written atomically, so concurrent experts may race to write it harmlessly).
Weighted by segment size, the experts' validation losses give the mixture's validation loss during
training (the report's Figure 2 curve).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..data.manifest import is_prepared, read_data_manifest
from ..data.shards import TokenDataset
from ..errors import SmallTalkError
from ..routing import rule
from ..io import atomic_open, atomic_write_json, read_json
from ..data.splits import SplitData, load_split
from ..routing.routers_dir import has_routers, read_routers_manifest
from ..routing.sharding import ShardsManifest, read_shards_manifest
from ..train.layout import TrainerDir
from .config import RunConfig
from .layout import RunLayout, read_run_config
from .seed import branch_from_seed, check_seed_for_expert, read_seed, seed_done, seed_file


class SubsetDataset:
    """A view of some sequences of a TokenDataset (what `Trainer` needs for validation on a segment)."""

    def __init__(self, base: TokenDataset, indices: np.ndarray):
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64)
        self.seq_len, self.vocab_size = base.seq_len, base.vocab_size

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def num_tokens(self) -> int:
        return len(self) * self.seq_len

    def get(self, indices) -> np.ndarray:
        return self.base.get(self.indices[np.asarray(indices, dtype=np.int64)])

    def domains(self, indices=None) -> np.ndarray:
        return self.base.domains(self.indices if indices is None else self.indices[np.asarray(indices)])


def check_shards(layout: RunLayout, cfg: RunConfig) -> ShardsManifest:
    """The shards manifest, checked against the run config (E), the run's routers and its tokenizer."""
    manifest = read_shards_manifest(layout.shards)
    path, E = manifest.path, manifest.num_experts
    if E != cfg.num_experts:
        raise SmallTalkError(f"{path}: the data is sharded for num_experts={E} but the run config says "
                             f"num_experts={cfg.num_experts}; re-shard with E={cfg.num_experts} or use a config with "
                             f"num_experts={E}")
    if has_routers(layout.routers):
        mine = read_routers_manifest(layout.routers).weights_sha256
        used = manifest.routers_weights_sha256
        if used is not None and used != mine:
            raise SmallTalkError(f"{path}: these expert shards were routed by other routers "
                                 f"({manifest.routers_dir}) than this run's ({layout.routers}); "
                                 f"delete {layout.shards} and re-run the shard stage with this run's routers")
    if is_prepared(layout.data) and manifest.tokenizer_sha256:
        data_sha = read_data_manifest(layout.data).tokenizer_identity()
        if data_sha and data_sha != manifest.tokenizer_sha256:
            raise SmallTalkError(f"{path}: the shards were made with tokenizer sha256 {manifest.tokenizer_sha256[:12]} "
                                 f"but this run's data ({layout.data}) uses {data_sha[:12]}; re-shard this run's data")
    return manifest


PROVENANCE_FILE = "provenance.json"


def shards_provenance(layout: RunLayout) -> dict:
    """What an expert of this run consumed: the shards manifest, hence the routers and tokenizer behind them, and
    (split training) the seed it branched from."""
    from ..model.io import sha256_file

    manifest = read_shards_manifest(layout.shards)
    record = {"shards_manifest_sha256": sha256_file(manifest.path),
              "routers_weights_sha256": manifest.routers_weights_sha256,
              "tokenizer_sha256": manifest.tokenizer_sha256}
    if seed_done(layout):
        seed = read_json(seed_file(layout))
        record.update(seed_weights_sha256=seed["weights_sha256"], seed_step=seed["step"])
    return record


def check_expert_provenance(layout: RunLayout, k: int) -> None:
    """Refuse expert k when it was trained on other shards, or branched from another seed, than this run's."""
    path = layout.expert(k) / PROVENANCE_FILE
    if not path.is_file():
        return  # trained before provenance was recorded
    recorded, now = read_json(path), shards_provenance(layout)
    if recorded.get("shards_manifest_sha256") != now["shards_manifest_sha256"]:
        raise SmallTalkError(f"{path}: expert {k} was trained on other shards than {layout.shards_manifest} (routers "
                             f"{str(recorded.get('routers_weights_sha256'))[:40]}...); delete {layout.expert(k)} and "
                             "re-train it on this run's shards")
    seed = recorded.get("seed_weights_sha256")
    if seed is not None and seed != now.get("seed_weights_sha256"):
        raise SmallTalkError(f"{path}: expert {k} branched from a seed with weights sha256 {seed[:12]} (step "
                             f"{recorded.get('seed_step')}), but {seed_file(layout)} now holds "
                             f"{str(now.get('seed_weights_sha256'))[:12]}; delete {layout.expert(k)} and re-train it "
                             "from this run's seed")


def check_expert_shard(layout: RunLayout, k: int) -> Path:
    directory = layout.expert_shard(k)
    if not directory.is_dir() or not any(directory.glob("shard_*.bin")):
        raise SmallTalkError(f"{directory}: expert {k} has no training shard; re-run the shard stage")
    return directory


def expert_shard(layout: RunLayout, k: int) -> TokenDataset:
    return TokenDataset.from_dir(check_expert_shard(layout, k))


def valid_routes(layout: RunLayout, cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    """(indices, experts): `cfg.valid_seqs` evenly spaced valid sequences and the expert the routers send
    each to (argmax of prefix scores, as at inference). Cached in ``experts/valid_routes.npy``."""
    from ..data.splits import evenly_spaced

    path = layout.valid_routes
    if path.is_file():
        table = np.load(path)  # (2, n): indices, experts
        return table[0], table[1]
    from ..routing.routers_dir import load_routers
    from ..routing.score import StackedRouters, score_dataset
    from ..mixture.inference import resolve_device

    device = resolve_device(cfg.device)
    models, _ = load_routers(layout.routers, device=str(device))
    valid = load_split(layout.data, "valid").dataset
    indices = evenly_spaced(len(valid), cfg.valid_seqs)
    scores = score_dataset(StackedRouters(models, device=device), valid, indices, cfg.prefix_len)
    table = np.stack([indices, rule.route(scores)]).astype(np.int64)  # Eq. 7, as at inference
    with atomic_open(path, "wb") as f:
        np.save(f, table)
    return table[0], table[1]


def valid_segment(layout: RunLayout, cfg: RunConfig, k: int) -> SplitData | None:
    """Expert k's segment of the valid split (None when the routers send it no valid sequence)."""
    split = load_split(layout.data, "valid")
    indices, experts = valid_routes(layout, cfg)
    indices = indices[experts == k]
    if len(indices) == 0:
        return None
    num_bytes = int(split.num_bytes * len(indices) / len(split.dataset)) if split.num_bytes else None
    return SplitData(SubsetDataset(split.dataset, indices), "valid", num_bytes, split.tokenizer_file,
                     split.tokenizer_sha256)


def expert_done(layout: RunLayout, k: int) -> bool:
    return TrainerDir(layout.expert(k)).is_done()


def train_expert(run_dir: str | Path, k: int, *, cfg: RunConfig | None = None, progress: bool | None = None,
                 log=print) -> dict[str, Any]:
    """Train (or resume, or confirm finished) expert `k` of a run; returns the trainer's run summary.
    The expert's directory is locked while it trains (other experts of the run may train at the same time)."""
    from ..locks import DirLock

    layout = RunLayout(run_dir)
    cfg = cfg or read_run_config(run_dir)
    if not isinstance(k, int) or not 0 <= k < cfg.num_experts:
        raise SmallTalkError(f"--expert {k}: the run has experts 0..{cfg.num_experts - 1}")
    check_shards(layout, cfg)  # refuse mismatched or missing shards (or seed) before anything is written
    check_expert_shard(layout, k)
    if cfg.split() is not None:
        read_seed(layout, cfg)
    with DirLock(layout.expert(k), f"training expert {k}", enabled=int(os.environ.get("RANK", "0")) == 0):
        return _train_expert(layout, k, cfg, progress, log)


def _train_expert(layout: RunLayout, k: int, cfg: RunConfig, progress: bool | None, log) -> dict[str, Any]:
    from ..train.trainer import Trainer, model_config_for_data

    check_shards(layout, cfg)
    if expert_done(layout, k):
        check_expert_provenance(layout, k)
        return read_json(TrainerDir(layout.expert(k)).summary)
    provenance = layout.expert(k) / PROVENANCE_FILE
    if provenance.is_file():
        check_expert_provenance(layout, k)  # a resumed expert must continue on the shards it started on
    else:
        atomic_write_json(provenance, shards_provenance(layout))
    train = expert_shard(layout, k)
    split = load_split(layout.data, "train")
    model_cfg = model_config_for_data(cfg.expert_model, train)
    plan = cfg.split()
    if plan is not None:
        check_seed_for_expert(layout, cfg, model_cfg.to_dict(), split.tokenizer_sha256)
    train_cfg = cfg.expert_train_config(k)
    valid = valid_segment(layout, cfg, k) if train_cfg.eval_every or train_cfg.eval_batches else None
    trainer = Trainer(model_cfg, train_cfg, train, layout.expert(k), valid_data=valid,
                      tokenizer_file=split.tokenizer_file, tokenizer_sha256=split.tokenizer_sha256, progress=progress)
    resuming = trainer.step > 0
    if plan is not None and not resuming:
        branch_from_seed(trainer, layout, cfg)
    if trainer.dist.is_main:
        start = (f"; resuming at step {trainer.step}" if resuming else
                 f"; branched from the seed, from step {trainer.step}" if plan is not None else "")
        log(f"expert {k}: {len(train)} training sequences, {model_cfg.describe()}; {train_cfg.describe()}{start}")
    return trainer.train()
