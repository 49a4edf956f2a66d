"""Add experts for new data to a trained mixture without retraining the others: `smalltalk grow`.

    grow_bundle("runs/x/bundle", ["new_domain/"], "runs/x/bundle-grown")

1. The new data is tokenized with the bundle's own tokenizer and context (`prepare`): files or folders as
   `prepare` reads them (a folder with train/ and valid/ or test/ keeps its splits, anything else is split
   by document hash), or a directory already prepared with the bundle's tokenizer. At least
   `GrowConfig.min_train_seqs` training sequences per new expert are needed (one batch of each trainer, and
   enough for a router to learn what the new text looks like).
2. One new router, of the same architecture as the others, is trained on the new data's prefixes with the
   Eq. 9 loss (the M-step of EM, on the new data only: there is nothing to re-assign). With `new_experts`
   K > 1, K new routers are trained by EM among themselves on the new data (balanced within it: Algorithm 1
   on the new data alone) and shard it.
3. One new expert is trained on the new data (on each shard): from scratch (the default) or branched from an
   existing expert (`branch_from`, BTM-style: an index, or "nearest" for the expert whose router claims most
   of its training data), with the bundle's expert settings unless overridden.
4. A bundle of E + K experts is written to a new directory; the E old routers and experts are linked or
   copied byte for byte, so their files keep their hashes, and the original bundle is never modified.

Routing stays an argmax over independent routers (Eq. 7): a new-data sequence that an old router explains
better than the new one still goes to that old expert, and old traffic moves only where the new router
explains it better than its old router does. `lineage.json` records the source bundle, the data, how the
grown mixture routes the new data's held-out split (the share an old router keeps is the measure of how
well the independently trained routers' scores compare) and the training FLOPs of growing next to those of
retraining a mixture of E + K from scratch.

Work (prepared data, checkpoints) goes to ``<out>.grow-work`` beside `out` and resumes after an interruption.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config_dict import DictConfig, check_field_types
from ..errors import SmallTalkError
from ..io import atomic_write_json, read_json
from ..model.flops import forward_flops, training_flops_per_step
from ..model.io import WEIGHTS_FILE, load_weights, read_model_config
from .bundle import build_bundle, read_bundle


NEAREST = "nearest"
ROUTING_SAMPLE = 1024
"""New-data sequences routed to pick the nearest expert and to measure the grown mixture's routing."""


@dataclass
class GrowConfig(DictConfig):
    config_kind = "grow config"

    router_steps: int = 0
    """Steps of the new router (0: as many as each old router got in EM, from the bundle's run config)."""
    expert_steps: int = 0
    """Steps of the new expert (0: the old experts' steps, from the bundle's run config)."""
    expert_batch_size: int = 0
    """Sequences per step of the new expert (0: the old experts')."""
    branch_from: int | str | None = None
    """Start the new expert from this expert's weights instead of a fresh initialisation; "nearest": the
    expert whose router claims most of the new training data."""
    new_experts: int = 1
    """K: new experts (and routers) to add; with K > 1 the new routers are trained by EM among themselves on the
    new data and shard it (balanced within it), the old routers untouched."""
    seed: int = 0
    min_train_seqs: int = 64
    """Refuse new data with fewer training sequences than this."""
    max_bytes_per_file: int | None = None
    """Read only this much text of each new file (as `prepare`)."""
    device: str = "auto"

    def __post_init__(self) -> None:
        check_field_types(self, self.config_kind)
        if self.new_experts < 1:
            raise SmallTalkError(f"grow config: new_experts={self.new_experts} must be >= 1")
        for key in ("router_steps", "expert_steps", "expert_batch_size", "seed"):
            if getattr(self, key) < 0:
                raise SmallTalkError(f"grow config: {key}={getattr(self, key)} must be >= 0")
        if isinstance(self.branch_from, str) and self.branch_from != NEAREST:
            raise SmallTalkError(f"grow config: branch_from={self.branch_from!r} must be an expert index or "
                                 f"{NEAREST!r}")
        if self.min_train_seqs < 1:
            raise SmallTalkError(f"grow config: min_train_seqs={self.min_train_seqs} must be >= 1")


def _new_data(info, sources: Sequence[str], work: Path, cfg: GrowConfig):
    from ..data.manifest import is_prepared
    from ..data.prepare import prepare
    from ..data.prepare_config import PrepareConfig
    from ..data.splits import load_split

    given = Path(sources[0]) if len(sources) == 1 else None
    if given is not None and is_prepared(given):
        data_dir = given
    else:
        data_dir = work / "data"
        try:
            prepare(PrepareConfig(corpus=tuple(str(s) for s in sources), out_dir=str(data_dir),
                                  tokenizer_file=str(info.tokenizer_file), seq_len=info.seq_len, progress=False,
                                  max_bytes_per_file=cfg.max_bytes_per_file, name="grow"), log=lambda m: None)
        except SmallTalkError as e:
            if "fewer than one sequence" not in str(e):
                raise
            raise SmallTalkError(_too_little(sources, 0, info.seq_len, cfg.min_train_seqs * cfg.new_experts,
                                             cfg.new_experts)) from None
    train = load_split(data_dir, "train")
    if train.tokenizer_sha256 and info.tokenizer_sha256 and train.tokenizer_sha256 != info.tokenizer_sha256:
        raise SmallTalkError(f"{data_dir}: prepared with tokenizer {train.tokenizer_sha256[:12]}, the bundle uses "
                             f"{info.tokenizer_sha256[:12]}; give the raw files (they are tokenized with the bundle's "
                             "tokenizer) or data prepared with `smalltalk prepare --tokenizer BUNDLE/tokenizer.json`")
    if train.dataset.seq_len != info.seq_len:
        raise SmallTalkError(f"{data_dir}: sequences of {train.dataset.seq_len} tokens, the bundle's models use "
                             f"{info.seq_len}; prepare it with --seq-len {info.seq_len}")
    need = cfg.min_train_seqs * cfg.new_experts
    if len(train.dataset) < need:
        raise SmallTalkError(_too_little(sources, len(train.dataset), info.seq_len, need, cfg.new_experts))
    return data_dir, train


def _routed(bundle: Path, split, device: str) -> np.ndarray:
    """(E,) how many of (up to ROUTING_SAMPLE evenly spaced) sequences of `split` each expert of `bundle` gets."""
    from ..data.splits import evenly_spaced
    from ..routing.rule import route
    from ..routing.score import score_dataset
    from .inference import Mixture

    mixture = Mixture.load(bundle, device=device)
    scores = score_dataset(mixture.routers, split.dataset, evenly_spaced(len(split.dataset), ROUTING_SAMPLE),
                           mixture.info.prefix_len)
    return np.bincount(route(scores), minlength=mixture.num_experts)


def _nearest_expert(bundle: Path, train, device: str) -> int:
    """The old expert whose router claims most of the new training data (ties: the lower index)."""
    return int(_routed(bundle, train, device).argmax())


def _routing_counts(bundle: Path, data_dir: Path, device: str, new_experts: int = 1) -> dict:
    """How the grown bundle routes the new data's held-out split (valid, else test; train when the new
    data was too small to hold any out)."""
    from ..data.manifest import read_data_manifest
    from ..data.splits import load_split

    data = read_data_manifest(data_dir)
    split = next(s for s in ("valid", "test", "train") if data.num_seqs(s) > 0)
    counts = _routed(bundle, load_split(data_dir, split), device)
    return {"split": split, "per_expert": counts.tolist(),
            "new_expert_share": float(counts[-new_experts:].sum() / counts.sum())}


def _too_little(sources: Sequence[str], have: int, seq_len: int, need: int, new_experts: int = 1) -> str:
    who = "a new expert needs" if new_experts == 1 else \
        f"that {new_experts} new experts need ({need // new_experts} each)"
    return (f"{', '.join(map(str, sources))}: {have} training sequences of {seq_len} tokens, fewer than the {need} "
            f"{who}; give more text (at least ~{need * seq_len:,} tokens in the train split)")


def grow_bundle(bundle: str | Path, sources: Sequence[str], out: str | Path, cfg: GrowConfig | None = None) -> dict:
    """A bundle of E + K experts at `out`: the old ones untouched plus K new routers and experts for `sources`."""
    from ..routing.config import RouterEMConfig
    from ..train.config import TrainConfig

    cfg = cfg or GrowConfig()
    info = read_bundle(bundle)
    out = Path(out)
    if out.exists():
        raise SmallTalkError(f"--out {out}: already exists; give a new directory (the original bundle is untouched)")
    if isinstance(cfg.branch_from, int) and not 0 <= cfg.branch_from < info.num_experts:
        raise SmallTalkError(f"branch_from={cfg.branch_from}: the bundle has experts 0..{info.num_experts - 1}")
    damaged = info.damaged()
    if damaged:
        raise SmallTalkError(f"bundle {info.root}: {damaged[0]}; repair the bundle before growing it")
    run_cfg = read_json(info.root / "run_config.json") if (info.root / "run_config.json").is_file() else None
    if run_cfg is None and not (cfg.router_steps and cfg.expert_steps and cfg.expert_batch_size):
        raise SmallTalkError(f"{info.root}: no run_config.json to take the training settings from; give "
                             "--router-steps, --expert-steps and --expert-batch-size")
    E, K = info.num_experts, cfg.new_experts
    work = out.parent / f"{out.name}.grow-work"
    data_dir, train = _new_data(info, sources, work, cfg)

    # The new routers: the old routers' architecture and EM settings, trained on the new data's prefixes.
    router_cfg, _ = read_model_config(info.routers[0].dir)
    em = RouterEMConfig.from_dict(run_cfg["routers"]) \
        if run_cfg else RouterEMConfig(prefix_len=info.prefix_len, router_preset="tiny")
    if K == 1:
        router_dirs, shards, router_flops = _one_router(info, em, router_cfg, train, work, cfg)
    else:
        router_dirs, shards, router_flops = _routers_by_em(info, em, router_cfg, data_dir, train, work, cfg)

    # The new experts: the old experts' architecture, from scratch or branched from one of them.
    expert_cfg, _ = read_model_config(info.experts[0].dir)
    base = TrainConfig.from_dict(run_cfg["expert_train"]) if run_cfg else TrainConfig()
    expert_train = base.replace(max_steps=cfg.expert_steps or base.max_steps,
                                batch_size=cfg.expert_batch_size or base.batch_size, device=cfg.device, eval_every=0,
                                eval_batches=0)
    S = info.seq_len - 1  # positions a training step runs on
    expert_dirs, parents, scoring_flops = [], [], 0
    for k, shard in enumerate(shards):
        parent = _nearest_expert(info.root, shard, cfg.device) if cfg.branch_from == NEAREST else cfg.branch_from
        if cfg.branch_from == NEAREST:  # picking the parent ran the E old routers over the new prefixes
            scoring_flops += E * forward_flops(router_cfg, min(ROUTING_SAMPLE, len(shard.dataset)), info.prefix_len)
        expert_dirs.append(_train_expert(info, expert_cfg, expert_train.replace(
            seed=cfg.seed + 1 + E + k, name=f"grown-expert-{E + k}"), shard, parent, work / _expert_work(K, k)))
        parents.append(parent)
    expert_flops = K * expert_train.max_steps * training_flops_per_step(expert_cfg, expert_train.batch_size, S)

    old_seqs = [int(x.train_seqs or 1) for x in info.experts]
    new = build_bundle(out, router_dirs=[r.dir for r in info.routers] + router_dirs,
                       expert_dirs=[x.dir for x in info.experts] + expert_dirs,
                       tokenizer_file=info.tokenizer_file, prefix_len=info.prefix_len,
                       train_seqs=old_seqs + [len(sh.dataset) for sh in shards], run_config=run_cfg)
    grow_flops = router_flops + expert_flops + scoring_flops
    old_router_flops = em.total_steps * training_flops_per_step(router_cfg, em.batch_size, info.prefix_len - 1)
    old_expert_flops = base.max_steps * training_flops_per_step(expert_cfg, base.batch_size, S)
    retrain = (E + K) * (old_router_flops + old_expert_flops)
    lineage = {"from": str(info.root.resolve()), "added_expert": E, "added_experts": list(range(E, E + K)),
               "data": [str(s) for s in sources], "data_dir": str(data_dir), "new_train_seqs": len(train.dataset),
               "new_expert_train_seqs": [len(sh.dataset) for sh in shards],
               "branch_from": parents[0] if K == 1 else parents,
               "config": dataclasses.asdict(cfg), "new_data_routing": _routing_counts(out, data_dir, cfg.device, K),
               "training_flops": {"grow": grow_flops, "retrain_e_plus_k_from_scratch": retrain,
                                  "retrain_e_plus_1_from_scratch": retrain if K == 1 else None,
                                  "grow_over_retrain": grow_flops / retrain if retrain else None,
                                  "note": "growing counts the new routers' and experts' steps, and the routers' "
                                          "scoring of new prefixes (EM and sharding among the new routers, "
                                          "--branch-from nearest); retraining counts the router M-steps and expert "
                                          "steps of E + K models without EM's and sharding's scoring, so it is a "
                                          "lower bound"}}
    atomic_write_json(out / "lineage.json", lineage)
    return {"bundle": str(new.root), "num_experts": new.num_experts, **lineage}


def _expert_work(K: int, k: int) -> str:
    return "expert" if K == 1 else f"expert_{k}"


def _one_router(info, em, router_cfg, train, work: Path, cfg: GrowConfig):
    """One new router trained on all the new data's prefixes (the M-step of EM; there is nothing to re-assign)."""
    from ..train.trainer import Trainer

    router_train = em.train_config(info.num_experts).replace(
        max_steps=cfg.router_steps or em.total_steps, seed=cfg.seed * 1000 + info.num_experts, device=cfg.device,
        loss_prefix_len=info.prefix_len, keep_last_k=1)
    Trainer(router_cfg, router_train, train, work / "router", progress=False,
            tokenizer_file=info.tokenizer_file).train()
    flops = router_train.max_steps * training_flops_per_step(router_cfg, router_train.batch_size, info.prefix_len - 1)
    return [work / "router" / "model"], [train], flops


def _routers_by_em(info, em, router_cfg, data_dir: Path, train, work: Path, cfg: GrowConfig):
    """K new routers trained by EM among themselves on the new data (balanced within it), then the new data
    sharded by them: Algorithm 1 on the new data alone, the old routers untouched."""
    from ..data.manifest import read_data_manifest
    from ..data.splits import load_split
    from ..routing.em import train_routers
    from ..routing.sharding import shard_dataset

    K, M = cfg.new_experts, info.prefix_len
    steps = cfg.router_steps // em.iterations if cfg.router_steps else em.steps_per_iteration
    valid = read_data_manifest(data_dir).num_seqs("valid")
    new_em = em.replace(num_experts=K, seed=cfg.seed, device=cfg.device, steps_per_iteration=max(1, steps),
                        seqs_per_iteration=min(max(1, steps) * em.batch_size * K, len(train.dataset)),
                        heldout_seqs=min(em.heldout_seqs, valid), name="grown")
    manifest = train_routers(data_dir, work / "em", new_em, log=lambda m: None)
    shards = shard_dataset(data_dir, work / "em" / "routers", work / "shards", device=cfg.device, log=lambda m: None)
    counts = [int(x["train"]) for x in shards["experts"]]
    if min(counts) < cfg.min_train_seqs:
        raise SmallTalkError(f"{data_dir}: EM among {K} new routers gave shards of {counts} training sequences; each "
                             f"new expert needs at least {cfg.min_train_seqs}: give more text or fewer new experts")
    iterations = int(manifest["iterations_completed"])
    flops = (K * new_em.steps_per_iteration * iterations
             * training_flops_per_step(router_cfg, new_em.batch_size, M - 1)
             + K * forward_flops(router_cfg, new_em.num_seqs * iterations + len(train.dataset), M))
    router_dirs = [work / "em" / "routers" / f"router_{k}" for k in range(K)]
    return router_dirs, [load_split(work / "shards" / f"expert_{k}", "train") for k in range(K)], flops


def _train_expert(info, expert_cfg, expert_train, data, parent: int | None, run: Path) -> Path:
    from ..train.trainer import Trainer

    expert = Trainer(expert_cfg, expert_train, data, run, progress=None, tokenizer_file=info.tokenizer_file)
    if parent is not None and expert.step == 0:
        load_weights(info.experts[parent].dir / WEIGHTS_FILE, expert.model)
    expert.train()
    return run / "model"
