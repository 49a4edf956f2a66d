"""Where each stage of a run keeps its output (the run directory is the only shared state)::

    <run>/
      run_config.json                  resolved RunConfig the run was started with
      stages.json                      seconds each stage took (report only)
      data/                            `smalltalk prepare`: manifest.json, tokenizer.json, train/valid/test shards
      routers/                         router EM: router_{e}/ model dirs, manifest.json, em_log.jsonl
      shards/                          sharding: expert_{e}/train/shard_*.bin, manifest.json
      seed/                            split training's dense seed (a trainer run stopped at its seed step), seed.json
      experts/expert_{k}/              expert k's trainer run: checkpoints/, metrics.jsonl, model/, run.json
      experts/valid_routes.npy         expert of each valid sequence (validation on own segment)
      dense/                           dense baseline's trainer run (same files)
      bundle/                          the servable mixture (mixture/bundle.py)
      eval/results.json                mixture vs dense on the test split
      results.json, report.md, plots/  the report
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import SmallTalkError
from ..io import read_json
from ..routing.routers_dir import router_dir, routers_dir
from ..routing.sharding import SHARDS_MANIFEST, expert_shard_dir
from ..train.layout import TrainerDir
from .config import RunConfig

ANALYSIS_DIR = "analysis"


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def analysis(self) -> Path:
        """``smalltalk analyze`` outputs: one folder per analysis, each with its report ``section.md``."""
        return self.root / ANALYSIS_DIR

    def analysis_sections(self) -> str:
        """All ``analysis/*/section.md``, in name order, joined (for the run report)."""
        if not self.analysis.is_dir():
            return ""
        parts = [p.read_text(encoding="utf-8").strip() for p in sorted(self.analysis.glob("*/section.md"))]
        return "\n\n".join(parts) + ("\n" if parts else "")

    @property
    def config(self) -> Path:
        return self.root / "run_config.json"

    @property
    def stages(self) -> Path:
        return self.root / "stages.json"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def routers(self) -> Path:
        return routers_dir(self.root)

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def shards_manifest(self) -> Path:
        return self.shards / SHARDS_MANIFEST

    def expert_shard(self, k: int) -> Path:
        return expert_shard_dir(self.shards, k) / "train"

    @property
    def seed(self) -> Path:
        """Split training's dense seed: a `TrainerDir` stopped at the seed step, with ``seed.json`` once complete."""
        return self.root / "seed"

    def expert(self, k: int) -> Path:
        """Expert k's trainer run directory (a `TrainerDir`)."""
        return self.root / "experts" / f"expert_{k}"

    def expert_model(self, k: int) -> Path:
        return TrainerDir(self.expert(k)).model

    def expert_log(self, k: int) -> Path:
        """Expert k's log when it trains as its own process (`smalltalk run --expert-workers`)."""
        return self.root / "experts" / f"expert_{k}.log"

    @property
    def valid_routes(self) -> Path:
        return self.root / "experts" / "valid_routes.npy"

    @property
    def dense(self) -> Path:
        """The dense baseline's trainer run directory (a `TrainerDir`)."""
        return self.root / "dense"

    @property
    def dense_model(self) -> Path:
        return TrainerDir(self.dense).model

    def router(self, e: int) -> Path:
        return router_dir(self.routers, e)

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    @property
    def eval_results(self) -> Path:
        return self.root / "eval" / "results.json"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config a run directory was started with (``<run>/run_config.json``)."""
    path = RunLayout(run_dir).config
    if not path.is_file():
        raise SmallTalkError(f"{path}: not found; {Path(run_dir)} is not a run directory (start one with "
                             "`smalltalk run --config ... --out RUN_DIR --until shard`)")
    return RunConfig.from_dict(read_json(path))
