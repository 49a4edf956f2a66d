"""What a server answers with: a mixture bundle (routers + experts) or one model directory.

    served = ServedModels.open(ServeConfig(path="runs/quickstart/bundle"))
    served.route([[ids...], ...])   # one Route per prompt, all scored by the routers in one batch
    served.expert(e)                # the local Transformer of expert e (lazily loaded)

Routing is `Mixture.route_ids` (paper Eq. 4-8), the same rule as `smalltalk route`, evaluation and
sharding. A model directory is a mixture of one: every prompt goes to expert 0 and nothing is scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import SmallTalkError
from ..mixture.inference import Mixture, Route, resolve_device
from ..model.transformer import Transformer
from ..run.locate import locate
from .config import RemoteExpert, ServeConfig


@dataclass
class ServedModels:
    name: str
    """Model id of the whole (the mixture, or the single model)."""
    tokenizer: object
    """`smalltalk.data.tokenizer.TextTokenizer`."""
    eos_id: int
    max_len: int
    """Context window of the experts, in tokens."""
    vocab_size: int
    num_experts: int
    prefix_len: int | None
    """M-hat (None for a single model)."""
    remote: dict[int, RemoteExpert]
    mixture: Mixture | None = None
    single: Transformer | None = None

    @classmethod
    def open(cls, cfg: ServeConfig) -> "ServedModels":
        located = locate(cfg.path, what="serve")
        path = located.served
        device = resolve_device(cfg.device)
        if located.bundle is not None:
            from ..mixture.bundle import read_bundle

            info = read_bundle(path)
            mixture = Mixture(info, device=device, max_loaded_experts=cfg.max_loaded_experts or info.num_experts)
            m = mixture.check_prefix_len(cfg.prefix_len)
            E = mixture.num_experts
            bad = sorted(k for k in cfg.experts if not 0 <= k < E)
            if bad:
                raise SmallTalkError(f"remote expert {bad[0]}: the bundle {path} has experts 0..{E - 1}")
            name = cfg.served_model_name or _dir_name(path)
            return cls(name=name, tokenizer=mixture.tokenizer, eos_id=int(mixture.eos_id),
                       max_len=int(mixture.info.seq_len), vocab_size=int(mixture.info.vocab_size), num_experts=E, prefix_len=m, remote=dict(cfg.experts),
                       mixture=mixture)
        if cfg.experts:
            raise SmallTalkError(f"{path}: remote experts need a mixture bundle; a model directory is one model")
        if cfg.prefix_len is not None:
            raise SmallTalkError(f"--prefix-len applies to a mixture bundle; {path} is one model")
        from ..model.io import load_with_tokenizer

        model, tokenizer = load_with_tokenizer(path, device)
        model.eval()
        return cls(name=cfg.served_model_name or _dir_name(path), tokenizer=tokenizer, eos_id=int(tokenizer.eos_id),
                   max_len=model.config.max_seq_len, vocab_size=model.config.vocab_size, num_experts=1, prefix_len=None, remote={}, single=model)

    @property
    def is_mixture(self) -> bool:
        return self.mixture is not None

    def expert_name(self, e: int) -> str:
        return f"{self.name}/expert-{e}" if self.is_mixture else self.name

    @property
    def fallback_expert(self) -> int:
        return self.mixture.info.fallback_expert if self.mixture else 0

    def route(self, prompts: list[list[int]]) -> list[Route]:
        """One routing decision per prompt (token ids); the routers score all prompts in one batch."""
        if self.mixture is None:
            return [Route(0, np.zeros(1), 0, len(p)) for p in prompts]
        return self.mixture.route_ids(prompts, self.prefix_len)

    def expert(self, e: int) -> Transformer:
        if self.mixture is None:
            return self.single  # type: ignore[return-value]
        return self.mixture.expert(e)

    @property
    def device(self) -> torch.device:
        return self.mixture.device if self.mixture else next(self.single.parameters()).device  # type: ignore


def _dir_name(path: Path) -> str:
    path = path.resolve()
    # runs/NAME/bundle and runs/NAME/dense/model read better as NAME and NAME/dense.
    if path.name == "bundle":
        return path.parent.name
    if path.name == "model":
        return f"{path.parent.parent.name}/{path.parent.name}"
    return path.name
