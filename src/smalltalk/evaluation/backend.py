"""What the evaluation talks to: a mixture bundle (routers + experts) or a single model directory.

Both expose the same small surface, so the lm-eval model never branches on which it has:

    models = EvalModels.open(bundle="runs/x/bundle")   # or model="runs/x/dense/model"
    experts = models.route([[ids...], ...])            # expert index per token sequence
    models.expert(e)                                   # Transformer (lazily loaded for a bundle)
    models.tokenizer, models.eos_id, models.max_length, models.num_experts

Routing is `smalltalk.mixture.inference.Mixture.route_ids` (paper Eq. 4-8: argmax over the E routers
of the log-likelihood of EOS + the first M-hat tokens; an empty sequence goes to the bundle's
fallback expert). A single model is a mixture of one: every sequence goes to expert 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..errors import SmallTalkError
from ..model.transformer import Transformer


def pick_device(device: str | torch.device | None) -> torch.device:
    """`device`, or CPU when it names CUDA on a machine without it (lm-eval's CLI defaults to cuda:0,
    and its Hugging Face model falls back the same way)."""
    if device is None or str(device) in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise SmallTalkError(f"device={device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        import logging

        logging.getLogger(__name__).warning("device %s requested but CUDA is not available; using cpu", device)
        return torch.device("cpu")
    return device


@dataclass
class EvalModels:
    kind: str
    """"mixture" or "single"."""
    path: Path
    tokenizer: object
    """HF `tokenizers.Tokenizer` (what `smalltalk.model.generate` takes)."""
    eos_id: int
    max_length: int
    """Context window of the experts (tokens)."""
    num_experts: int
    prefix_len: int | None
    """M-hat used for routing (None for a single model)."""
    device: torch.device
    mixture: object | None = None
    single: Transformer | None = None

    @classmethod
    def open(cls, *, bundle: str | Path | None = None, model: str | Path | None = None,
             prefix_len: int | None = None, device: str | torch.device | None = None,
             max_loaded_experts: int = 1) -> "EvalModels":
        if (bundle is None) == (model is None):
            raise SmallTalkError("give exactly one of bundle=PATH (a mixture) or model=MODEL_DIR (one model), "
                                 f"got bundle={bundle!r} model={model!r}")
        device = pick_device(device)
        if bundle is not None:
            return cls._open_bundle(Path(bundle), prefix_len, device, max_loaded_experts)
        if prefix_len is not None:
            raise SmallTalkError(f"prefix_len={prefix_len} only applies to a mixture bundle; drop it for model=")
        return cls._open_single(Path(model), device)

    @classmethod
    def _open_bundle(cls, path: Path, prefix_len, device, max_loaded_experts) -> "EvalModels":
        from ..mixture.inference import Mixture
        from ..run.locate import locate

        path = locate(path, want=("bundle",), what="bundle=").bundle
        mixture = Mixture.load(path, device=device, max_loaded_experts=max_loaded_experts)
        m = mixture.check_prefix_len(None if prefix_len is None else int(prefix_len))
        return cls(kind="mixture", path=path, tokenizer=mixture.tokenizer, eos_id=int(mixture.eos_id),
                   max_length=int(mixture.info.seq_len), num_experts=mixture.num_experts, prefix_len=m,
                   device=device, mixture=mixture)

    @classmethod
    def _open_single(cls, path: Path, device) -> "EvalModels":
        from tokenizers import Tokenizer

        from ..model.generate import eos_token_id
        from ..data.tokenizer import TOKENIZER_FILE
        from ..model.io import load_model_dir
        from ..run.locate import locate

        path = locate(path, what="model=").served
        model, _ = load_model_dir(path, device=device)
        tok_file = path / TOKENIZER_FILE
        if not tok_file.is_file():
            raise SmallTalkError(f"{tok_file}: the model directory has no tokenizer; save it with its tokenizer.json")
        try:
            tokenizer = Tokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises plain Exceptions on bad files
            raise SmallTalkError(f"{tok_file}: cannot read the tokenizer ({e})") from None
        eos = eos_token_id(tokenizer)
        if eos is None:
            raise SmallTalkError(f"{tok_file}: no EOS token (<|endoftext|>) in the tokenizer; the evaluation needs "
                                 "it as the document-start context")
        return cls(kind="single", path=path, tokenizer=tokenizer, eos_id=int(eos),
                   max_length=model.config.max_seq_len, num_experts=1, prefix_len=None, device=device,
                   single=model)

    def route(self, sequences: Sequence[Sequence[int]]) -> list[int]:
        """Expert index for each token sequence (its first M-hat tokens decide)."""
        if self.mixture is None:
            return [0] * len(sequences)
        return [r.expert for r in self.mixture.route_ids(sequences, self.prefix_len)]

    def expert(self, e: int) -> Transformer:
        return self.single if self.mixture is None else self.mixture.expert(e)

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "num_experts": self.num_experts,
                "prefix_len": self.prefix_len, "max_length": self.max_length, "device": str(self.device)}
