"""A finished run directory (`smalltalk run`) as the analyses see it: where its models and data are,
its config, its training partition, and its test scores (cached)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SmallTalkError
from ..data.manifest import is_prepared, read_data_manifest
from ..run.layout import RunLayout
from ..routing.routers_dir import has_routers
from ..mixture.scores import SequenceScores
from .output import ANALYSIS_DIR
from .scores import CACHE_DIR, score_models


@dataclass
class ScoreSettings:
    """Which sequences an analysis scores, and how; every analysis config extends this."""

    split: str = "test"
    max_seqs: int = 0
    """Evenly spaced subset of the split (0: all)."""
    batch_size: int = 16
    device: str = "auto"


@dataclass
class PrefixSettings(ScoreSettings):
    """Which sequences, and at which routing prefix lengths M-hat (the prefix-length and baseline analyses)."""

    prefix_lens: list[int] = field(default_factory=list)
    """M-hat values (empty: `prefix_length.default_prefix_lens`: 8, 16, 32, ... up to the context, plus M)."""


@dataclass
class RunView:
    root: Path
    layout: RunLayout
    config: object
    """The run's resolved `smalltalk.run.config.RunConfig`."""
    expert_dirs: list[Path]
    dense_dir: Path | None
    routers_dir: Path | None
    """None for a derived run whose routing is not by router LMs (TF-IDF, random shards)."""
    data_dir: Path

    @property
    def num_experts(self) -> int:
        return len(self.expert_dirs)

    @property
    def prefix_len(self) -> int:
        """M: the prefix the partition was trained with."""
        return int(self.config.prefix_len)

    @property
    def seq_len(self) -> int:
        return read_data_manifest(self.data_dir).seq_len

    @property
    def label(self) -> str:
        return str(self.config.name)

    def scores(self, settings: ScoreSettings | None = None, log=None) -> SequenceScores:
        """Every expert's and the dense model's per-token NLL on `settings.split` (cached in the run)."""
        s = settings or ScoreSettings()
        return score_models(self.expert_dirs, self.dense_dir, self.data_dir, split=s.split, max_seqs=s.max_seqs,
                            batch_size=s.batch_size, device=s.device, cache_dir=self.root / ANALYSIS_DIR / CACHE_DIR,
                            log=log)

    def train_assignment(self) -> np.ndarray:
        """(num_train_seqs,) expert of every training sequence, from the shards' per-chunk assignment files."""
        from ..routing.sharding import load_assignment

        return load_assignment(self.layout.shards)

    def domain_names(self) -> list[str]:
        return read_data_manifest(self.data_dir).domains


def _model_dir(layout: RunLayout, k: int) -> Path:
    # The bundle holds the experts that are served; the trainer's model/ is the same weights, hard-linked.
    bundled = layout.bundle / "experts" / f"expert_{k}"
    return bundled if (bundled / "model.safetensors").is_file() else layout.expert(k) / "model"


def open_run(run_dir: str | Path, *, need_experts: bool = True) -> RunView:
    """A run directory written by `smalltalk run` (at least through the experts and dense stages)."""
    from ..run.layout import read_run_config

    root = Path(run_dir)
    if not root.is_dir():
        raise SmallTalkError(f"--run {root}: no such directory; pass a run directory written by `smalltalk run`")
    cfg = read_run_config(root)
    layout = RunLayout(root)
    if not is_prepared(layout.data):
        raise SmallTalkError(f"{layout.data}: no prepared data there; the run has no prepared data yet "
                             "(run `smalltalk run` first)")
    experts = [_model_dir(layout, k) for k in range(cfg.num_experts)]
    missing = [str(d) for d in experts if not (d / "model.safetensors").is_file()]
    if need_experts and missing:
        raise SmallTalkError(f"{missing[0]}: expert weights not found; train the experts first (`smalltalk run "
                             "--config ... --out RUN_DIR`, or for a baseline `smalltalk analyze` without --no-train)")
    dense = layout.dense / "model"
    routers = layout.routers if has_routers(layout.routers) else None
    return RunView(root, layout, cfg, experts, dense if (dense / "model.safetensors").is_file() else None,
                   routers, layout.data)
