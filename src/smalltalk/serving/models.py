"""What a server answers with: `Models` (a mixture bundle or one model directory), its public name and the
experts served elsewhere.

    served = ServedModels.open(ServeConfig(path="runs/quickstart"))   # a run directory, bundle or model dir
    served.route([[ids...], ...])   # one Route per prompt, all scored by the routers in one batch
    served.expert(e)                # the local Transformer of expert e (lazily loaded)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SmallTalkError
from ..mixture.inference import resolve_device
from ..mixture.models import Models
from ..run.locate import locate
from .config import RemoteExpert, ServeConfig


@dataclass
class ServedModels(Models):
    name: str = ""
    """Model id of the whole (the mixture, or the single model)."""
    remote: dict[int, RemoteExpert] = field(default_factory=dict)

    @classmethod
    def open(cls, cfg: ServeConfig) -> "ServedModels":  # type: ignore[override]
        located = locate(cfg.path, what="serve")
        path = located.served
        if located.bundle is None:
            if cfg.experts:
                raise SmallTalkError(f"{path}: remote experts need a mixture bundle; a model directory is one model")
            if cfg.prefix_len is not None:
                raise SmallTalkError(f"--prefix-len applies to a mixture bundle; {path} is one model")
        device = resolve_device(cfg.device)
        models = Models.open(bundle=located.bundle, model=located.model, prefix_len=cfg.prefix_len, device=device,
                             max_loaded_experts=cfg.max_loaded_experts)
        bad = sorted(k for k in cfg.experts if not 0 <= k < models.num_experts)
        if bad:
            raise SmallTalkError(f"remote expert {bad[0]}: the bundle {path} has experts 0..{models.num_experts - 1}")
        return cls(**vars(models), name=cfg.served_model_name or _dir_name(path), remote=dict(cfg.experts))

    def expert_name(self, e: int) -> str:
        return f"{self.name}/expert-{e}" if self.is_mixture else self.name


def _dir_name(path: Path) -> str:
    path = path.resolve()
    # runs/NAME/bundle and runs/NAME/dense/model read better as NAME and NAME/dense.
    if path.name == "bundle":
        return path.parent.name
    if path.name == "model":
        return f"{path.parent.parent.name}/{path.parent.name}"
    return path.name
