"""What the evaluation talks to: `smalltalk.mixture.models.Models` (a mixture bundle or one model directory),
opened from what the user named (a run directory, a bundle, a model or training-run directory) on lm-eval's
device:

    models = open_models(bundle="runs/x")              # or model="runs/x/dense/model"
    models.route([[ids...], ...])                      # one Route per token sequence
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import SmallTalkError
from ..mixture.models import Models
from ..run.locate import locate


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


def open_models(*, bundle: str | Path | None = None, model: str | Path | None = None, prefix_len: int | None = None,
                device: str | torch.device | None = None, max_loaded_experts: int = 1) -> Models:
    """`Models` from a run directory or bundle (`bundle=`) or a model / training-run directory (`model=`)."""
    if (bundle is None) == (model is None):
        raise SmallTalkError("give exactly one of bundle=PATH (a mixture) or model=MODEL_DIR (one model), "
                             f"got bundle={bundle!r} model={model!r}")
    located = locate(bundle, want=("bundle",), what="bundle=") if bundle is not None else locate(model, what="model=")
    if model is not None and prefix_len is not None:
        raise SmallTalkError(f"prefix_len={prefix_len} only applies to a mixture bundle; drop it for model=")
    return Models.open(bundle=located.bundle, model=None if located.bundle else located.model, prefix_len=prefix_len,
                       device=pick_device(device), max_loaded_experts=max_loaded_experts)
