"""Model directories: the weights other stages load (routers, experts, the dense baseline).

Layout (docs/architecture.md)::

    <model_dir>/model.safetensors   Transformer state dict; a tied ``embed_out.weight`` is not stored twice
    <model_dir>/config.json         {"format": "smalltalk-model", "version": 1, "model": ModelConfig.to_dict(),
                                     "tokenizer_sha256": "..." | null, "producer": {...}, **extra}
    <model_dir>/tokenizer.json      copy of the tokenizer (absent when none was given)

The directory is written whole into a temporary sibling and renamed into place, so a reader sees
either the previous complete directory or the new one.

    save_model_dir(dir, model, tokenizer_file, extra=None)
    model, config_json = load_model_dir(dir, device="cpu")
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import SmallTalkError
from ..io import atomic_dir, atomic_write_json, current_umask, read_json, sha256_file  # noqa: F401
from ..data.tokenizer import TOKENIZER_FILE
from .config import ModelConfig
from .transformer import Transformer

FORMAT = "smalltalk-model"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def unwrap_model(model: torch.nn.Module) -> Transformer:
    """The plain Transformer inside a DDP (``.module``) and/or ``torch.compile`` (``._orig_mod``) wrapper."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def weights_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of the parameters to store; a tied output projection is dropped."""
    model = unwrap_model(model)
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("embed_out.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_weights(path: str | os.PathLike, model: torch.nn.Module, metadata: dict[str, str] | None = None) -> None:
    """Write the model's weights as safetensors to `path` (not atomic by itself: callers write into a temp dir)."""
    from safetensors.torch import save_file

    save_file(weights_state_dict(model), str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~current_umask())  # safetensors writes 0600; shared file systems need the umask's mode


def load_weights(path: str | os.PathLike, model: torch.nn.Module) -> None:
    """Load safetensors weights from `path` into `model` in place; bad files -> SmallTalkError naming `path`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise SmallTalkError(f"{path}: weights file not found")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SmallTalkError(f"{path}: cannot read weights ({e}); the file is corrupt or truncated, "
                             "delete it and re-create it") from None
    model = unwrap_model(model)
    expected = set(weights_state_dict(model))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise SmallTalkError(f"{path}: weights do not match the model config (missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}); was it written for another config?")
    own = model.state_dict()
    for name, tensor in state.items():
        if own[name].shape != tensor.shape:
            raise SmallTalkError(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, the model config needs "
                                 f"{tuple(own[name].shape)}; was it written for another config?")
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)


def _producer() -> dict[str, Any]:
    from ..version import __version__

    return {"smalltalk": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def save_model_dir(directory: str | os.PathLike, model: torch.nn.Module, tokenizer_file: str | os.PathLike | None,
                   extra: dict[str, Any] | None = None) -> Path:
    """Write `model` (+ a copy of `tokenizer_file`) as a model directory, replacing any previous one atomically.

    `extra` keys are added to config.json (for example the training step or the data it saw).
    """
    directory = Path(directory)
    model = unwrap_model(model)
    tokenizer_sha = None
    if tokenizer_file is not None:
        tokenizer_file = Path(tokenizer_file)
        if not tokenizer_file.is_file():
            raise SmallTalkError(f"{tokenizer_file}: tokenizer file not found")
        tokenizer_sha = sha256_file(tokenizer_file)
    config_json = {"format": FORMAT, "version": VERSION, "model": model.config.to_dict(),
                   "tokenizer_sha256": tokenizer_sha, "producer": _producer(), **(extra or {})}
    with atomic_dir(directory) as tmp:
        save_weights(tmp / WEIGHTS_FILE, model, metadata={"format": FORMAT})
        config_json["weights_sha256"] = sha256_file(tmp / WEIGHTS_FILE)
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
        atomic_write_json(tmp / CONFIG_FILE, config_json)
    return directory


def read_model_config(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """(ModelConfig, config.json dict) of a model directory, without loading weights."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SmallTalkError(f"{directory}: model directory not found")
    config_json = read_json(directory / CONFIG_FILE)
    if not isinstance(config_json, dict) or "model" not in config_json:
        raise SmallTalkError(f"{directory / CONFIG_FILE}: not a smalltalk model config (no 'model' key)")
    return ModelConfig.from_dict(config_json["model"]), config_json


def verify_model_dir(directory: str | os.PathLike, config_json: dict | None = None,
                     weights_sha256: str | None = None) -> None:
    """Check the weights and tokenizer files against the sha256 recorded in config.json when the directory
    was written (directories written before checksums were recorded are not checked). `weights_sha256`: the
    weights file's digest when the caller has already computed it (it is not hashed twice)."""
    directory = Path(directory)
    config_json = config_json if config_json is not None else read_model_config(directory)[1]
    weights, recorded = directory / WEIGHTS_FILE, config_json.get("weights_sha256")
    if recorded and weights.is_file() and (weights_sha256 or sha256_file(weights)) != recorded:
        raise SmallTalkError(f"{weights}: corrupt or truncated, its sha256 differs from the one recorded in {CONFIG_FILE} when it "
                             "was written; restore the file or re-train this model")
    tokenizer, recorded = directory / TOKENIZER_FILE, config_json.get("tokenizer_sha256")
    if recorded and tokenizer.is_file() and sha256_file(tokenizer) != recorded:
        raise SmallTalkError(f"{tokenizer}: not the tokenizer this model was trained with (sha256 "
                             f"{sha256_file(tokenizer)[:12]}, {directory / CONFIG_FILE} records {recorded[:12]}); "
                             "put the original tokenizer.json back")


def check_finite(model: torch.nn.Module, where: str | os.PathLike) -> None:
    """Refuse weights holding NaN or infinity (a diverged run saves them with a valid checksum)."""
    for name, p in unwrap_model(model).named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise SmallTalkError(f"{where}: weight {name} holds NaN or infinite values; the model diverged or the "
                                 "file was overwritten; re-train it")


def load_model_dir(directory: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True,
                   weights_sha256: str | None = None) -> tuple[Transformer, dict]:
    """Load a model directory -> (Transformer in eval mode on `device`, config.json dict). With `verify`, the
    files must match their recorded checksums and every weight must be finite (`weights_sha256`: the weights'
    digest if the caller already has it)."""
    directory = Path(directory)
    cfg, config_json = read_model_config(directory)
    if verify:
        verify_model_dir(directory, config_json, weights_sha256)
    model = Transformer(cfg)
    load_weights(directory / WEIGHTS_FILE, model)
    if verify:
        check_finite(model, directory / WEIGHTS_FILE)
    return model.to(device).eval(), config_json


def load_with_tokenizer(directory: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model, TextTokenizer) of a model directory: what generation, serving and text evaluation need."""
    from ..data.tokenizer import load_tokenizer

    tokenizer_file = Path(directory) / TOKENIZER_FILE
    if Path(directory).is_dir() and not tokenizer_file.is_file():
        raise SmallTalkError(f"{tokenizer_file}: not found; the model directory must hold its tokenizer.json")
    model, _ = load_model_dir(directory, device=device)
    return model, load_tokenizer(tokenizer_file)
