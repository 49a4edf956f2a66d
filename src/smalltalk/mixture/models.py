"""What answers prompts: a mixture bundle (routers + experts) or one model directory, behind one surface, so
neither the server nor the lm-eval model branches on which it has::

    models = Models.open(bundle="runs/x/bundle", device=torch.device("cpu"))   # or model="runs/x/dense/model"
    models.route([[ids...], ...])     # one Route per token sequence, all scored by the routers in one batch
    models.expert(e)                  # the Transformer of expert e (lazily loaded for a bundle)
    models.tokenizer, models.eos_id, models.max_len, models.num_experts, models.prefix_len

Routing is `Mixture.route_ids` (paper Eq. 4-8: argmax over the E routers of the log-likelihood of EOS + the
first M-hat tokens; an empty sequence goes to the bundle's fallback expert). A model directory is a mixture of
one: every sequence goes to expert 0 and nothing is scored. Paths are already resolved (`run.locate`): this
module does not know what a run directory is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import SmallTalkError
from ..model.transformer import Transformer
from .inference import Mixture, Route


@dataclass
class Models:
    path: Path
    tokenizer: object
    """`smalltalk.data.tokenizer.TextTokenizer`."""
    eos_id: int
    max_len: int
    """Context window of the experts, in tokens."""
    vocab_size: int
    num_experts: int
    prefix_len: int | None
    """M-hat used for routing (None for a single model)."""
    device: torch.device
    mixture: Mixture | None = None
    single: Transformer | None = None

    @classmethod
    def open(cls, *, bundle: str | Path | None = None, model: str | Path | None = None, prefix_len: int | None = None,
             device: torch.device, max_loaded_experts: int | None = 1) -> "Models":
        """Exactly one of `bundle` (a mixture) or `model` (one model directory); `max_loaded_experts` None: all."""
        if (bundle is None) == (model is None):
            raise SmallTalkError("give exactly one of bundle=PATH (a mixture) or model=MODEL_DIR (one model), "
                                 f"got bundle={bundle!r} model={model!r}")
        if bundle is not None:
            return cls._open_bundle(Path(bundle), prefix_len, device, max_loaded_experts)
        if prefix_len is not None:
            raise SmallTalkError(f"prefix_len={prefix_len} applies to a mixture bundle; {model} is one model")
        return cls._open_single(Path(model), device)

    @classmethod
    def _open_bundle(cls, path: Path, prefix_len, device, max_loaded_experts) -> "Models":
        from .bundle import read_bundle

        info = read_bundle(path)
        mixture = Mixture(info, device=device, max_loaded_experts=max_loaded_experts or info.num_experts)
        m = mixture.check_prefix_len(None if prefix_len is None else int(prefix_len))
        return cls(path=path, tokenizer=mixture.tokenizer, eos_id=int(mixture.eos_id), max_len=int(info.seq_len),
                   vocab_size=int(info.vocab_size), num_experts=mixture.num_experts, prefix_len=m, device=device,
                   mixture=mixture)

    @classmethod
    def _open_single(cls, path: Path, device) -> "Models":
        from ..model.io import load_with_tokenizer

        model, tokenizer = load_with_tokenizer(path, device)
        model.eval()
        return cls(path=path, tokenizer=tokenizer, eos_id=int(tokenizer.eos_id), max_len=model.config.max_seq_len,
                   vocab_size=model.config.vocab_size, num_experts=1, prefix_len=None, device=device, single=model)

    @property
    def is_mixture(self) -> bool:
        return self.mixture is not None

    @property
    def kind(self) -> str:
        return "mixture" if self.is_mixture else "single"

    @property
    def fallback_expert(self) -> int:
        return self.mixture.info.fallback_expert if self.mixture else 0

    def route(self, sequences: Sequence[Sequence[int]]) -> list[Route]:
        """One routing decision per token sequence (its first M-hat tokens decide)."""
        if self.mixture is None:
            return [Route(0, np.zeros(1), 0, len(s)) for s in sequences]
        return self.mixture.route_ids(sequences, self.prefix_len)

    def expert(self, e: int) -> Transformer:
        return self.single if self.mixture is None else self.mixture.expert(e)  # type: ignore[return-value]

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "num_experts": self.num_experts,
                "prefix_len": self.prefix_len, "max_length": self.max_len, "device": str(self.device)}
