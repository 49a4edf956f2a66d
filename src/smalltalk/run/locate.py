"""One opener for what users point commands at: a run directory, a mixture bundle or a model directory.

    located = locate("runs/quickstart")          # Located(kind="run", bundle=.../bundle, model=None, ...)
    located.bundle, located.dense, located.data  # what the run holds (None when absent)

Every command that takes such a path (serve, route, generate, grow, shrink, export, eval-mixture,
eval-downstream, the lm-eval model, the Python API) resolves it here, so "a run directory's bundle" and
"a training run's final model" are spelled in one place (`RunLayout`, `TrainerDir`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import SmallTalkError
from ..mixture.bundle import is_bundle
from ..model.io import CONFIG_FILE
from ..train.layout import TrainerDir
from .layout import RunLayout

KINDS = ("run", "bundle", "model")


@dataclass(frozen=True)
class Located:
    path: Path
    """What was given."""
    kind: str
    """"run" (a `smalltalk run` directory), "bundle" (a mixture) or "model" (one model directory)."""
    bundle: Path | None = None
    """The mixture bundle (a bundle, or a run's ``bundle/``)."""
    model: Path | None = None
    """The single model directory (a model directory, or a training run's ``model/``)."""
    run: Path | None = None

    @property
    def dense(self) -> Path | None:
        """The run's dense baseline model, when there is one."""
        if self.run is None:
            return None
        model = RunLayout(self.run).dense_model
        return model if is_model_dir(model) else None

    @property
    def data(self) -> Path | None:
        """The run's prepared data."""
        return RunLayout(self.run).data if self.run is not None else None

    @property
    def served(self) -> Path:
        """What answers prompts: the bundle, else the model directory."""
        return self.bundle or self.model  # type: ignore[return-value]


def is_model_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def locate(path: str | Path, *, want: tuple[str, ...] = ("bundle", "model"), what: str = "") -> Located:
    """Resolve `path` to a run directory, bundle or model directory; `want` names what the caller can use
    ("bundle": needs a mixture; "model": takes one model too). Errors name the path and what it lacks."""
    path = Path(path)
    prefix = f"{what}: " if what else ""
    if is_bundle(path):
        located = Located(path, "bundle", bundle=path)
    elif RunLayout(path).config.is_file() or is_bundle(RunLayout(path).bundle):
        layout = RunLayout(path)
        located = Located(path, "run", bundle=layout.bundle if is_bundle(layout.bundle) else None, run=path)
    elif is_model_dir(path):
        located = Located(path, "model", model=path)
    elif is_model_dir(TrainerDir(path).model):
        located = Located(path, "model", model=TrainerDir(path).model)
    elif "model" in want:  # nothing recognisable: the model loader's own error names what is missing
        located = Located(path, "model", model=path)
    else:  # likewise the bundle reader's
        located = Located(path, "bundle", bundle=path)
    if located.kind == "run" and located.bundle is None:
        raise SmallTalkError(f"{prefix}{path}: the run has no bundle yet; finish it with `smalltalk run` "
                             "(the bundle stage) first")
    if "model" not in want and located.bundle is None:
        raise SmallTalkError(f"{prefix}{path}: a model directory, not a mixture bundle; give a bundle or "
                             "a run directory holding bundle/")
    return located
