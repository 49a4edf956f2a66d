"""The public Python API: what `import smalltalk` offers (docs/python-api.md walks through it).

    import smalltalk
    results = smalltalk.run("tiny", "runs/quickstart")            # the whole pipeline, resumable
    mixture = smalltalk.Mixture.load("runs/quickstart")           # a run directory or a bundle
    mixture.route("def fibonacci(n):").expert
    mixture.generate("def fibonacci(n):", max_new_tokens=32, seed=0).result.text
    mixture.score(["my_docs/"])                                   # your own text, per file and per expert

Each name is a thin door onto the library function that does the work (`smalltalk.run.pipeline`,
`smalltalk.mixture.inference`, `smalltalk.mixture.text_eval`, `smalltalk.mixture.grow` / `shrink`); the CLI
calls the same functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .mixture.inference import Mixture as _BundleMixture
from .run.config import RunConfig, load_run_config
from .run.layout import RunLayout
from .run.locate import locate


class Mixture(_BundleMixture):
    """A trained mixture: E routers in memory, experts loaded when a prompt is routed to them."""

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> "Mixture":
        """`path`: a run directory (its ``bundle/``) or a bundle; keyword arguments as `Mixture` (device,
        max_loaded_experts)."""
        located = locate(path, want=("bundle",))
        mixture = super().load(located.bundle, **kwargs)
        mixture.run_dir = located.run
        return mixture

    def score(self, sources: Sequence[str | Path], *, dense: str | Path | None = None, **kwargs) -> dict:
        """Perplexity of the mixture on your own files (a directory, glob, .txt/.md/.jsonl/.parquet, ``hf:NAME``),
        per file (or `domain` field) and per expert; next to `dense` (default: the run's dense model, when
        loaded from a run directory). Keyword arguments as `smalltalk.mixture.text_eval.evaluate_text`."""
        from .mixture.text_eval import evaluate_text

        run_dir = getattr(self, "run_dir", None)
        if dense is None and run_dir is not None:
            dense = locate(run_dir).dense
        return evaluate_text(self.info.root, [str(s) for s in sources], dense=dense, **kwargs)


def run(config: str | Path | RunConfig, out: str | Path, *, until: str | None = None, expert_workers: int = 1,
        progress: bool | None = None, log=None, **overrides: Any) -> dict:
    """Run (or resume) the whole pipeline into `out`; returns the run's results (``results.json``) once the
    report is written, else the stage timings. `config`: a preset name (tiny, cpu, ...), a YAML/JSON file or a
    `RunConfig`; `overrides`: top-level fields (name, seed, num_experts, ...)."""
    from .io import read_json
    from .run.pipeline import run_pipeline

    if isinstance(config, RunConfig):
        cfg = RunConfig.from_dict({**config.to_dict(), **overrides}) if overrides else config
    else:
        cfg = load_run_config(config, **overrides)
    timings = run_pipeline(cfg, out, until=until, expert_workers=expert_workers, progress=progress, log=log)
    layout = RunLayout(out)
    return read_json(layout.results) if (until in (None, "report") and layout.results.is_file()) else timings


def grow(bundle: str | Path, data: Sequence[str | Path], out: str | Path, **settings: Any) -> dict:
    """Add experts for new data (`smalltalk grow`): a new bundle at `out`; `settings` are `GrowConfig` fields."""
    from .mixture.grow import GrowConfig, grow_bundle

    return grow_bundle(locate(bundle, want=("bundle",)).bundle, [str(d) for d in data], out, GrowConfig(**settings))


def shrink(bundle: str | Path, drop: Sequence[int], out: str | Path):
    """Remove experts (`smalltalk shrink`): a new bundle at `out` without experts `drop`; returns its info."""
    from .mixture.shrink import shrink_bundle

    return shrink_bundle(locate(bundle, want=("bundle",)).bundle, list(drop), out)
