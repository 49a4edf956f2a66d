"""Resumable training checkpoints, written atomically, the last K kept.

Layout::

    <run_dir>/checkpoints/
      latest                     name of the newest complete checkpoint ("step_00000100"), for tools
      step_00000100/
        model.safetensors        weights (tied output projection stored once)
        optimizer.pt             AdamW state dict (moments and step counts, fp32)
        indices.npy              the index set the sampler draws from (int64)
        state.json               step, sampler position, RNG states, tokens / FLOPs counters
        config.json              {"model": ..., "train": ..., "tokenizer_sha256": ..., "step": N}
        checksums.json           sha256 of every file above, verified before loading

A checkpoint is assembled in ``.step_00000100.<random>.partial/`` and renamed to its final name
only when every file is written and fsynced, so a directory named ``step_*`` is always complete;
the newest one is found by listing (the ``latest`` file is a convenience that may lag one rename).
If the disk fills up mid-write, the partial directory is removed and the previous checkpoint is
untouched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import SmallTalkError
from ..io import atomic_write_json, atomic_write_text, read_json, temp_dir
from ..model.config import ModelConfig
from ..model.io import load_weights, save_weights, sha256_file

_STEP_DIR = re.compile(r"^step_(\d{8,})$")
FILES = ("model.safetensors", "optimizer.pt", "indices.npy", "state.json", "config.json")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first, as (step, path)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def remove_partials(root: str | os.PathLike) -> int:
    """Delete ``*.partial`` directories left by a checkpoint write that was killed; returns how many."""
    root = Path(root)
    if not root.is_dir():
        return 0
    stale = [p for p in root.iterdir() if p.name.endswith(".partial")]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return len(stale)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: str | os.PathLike, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    indices: np.ndarray, state: dict[str, Any], config: dict[str, Any], keep_last_k: int) -> Path:
    """Write checkpoint `step` under `root` atomically, then delete all but the newest `keep_last_k`.

    Any OSError (disk full, quota, permissions) leaves the previous checkpoints as they were and is
    reported as a SmallTalkError naming the checkpoint and the previous one to resume from.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    previous = latest_checkpoint(root)
    tmp = temp_dir(f".{final.name}.", root)
    try:
        save_weights(tmp / "model.safetensors", model)
        with open(tmp / "optimizer.pt", "wb") as f:
            torch.save(optimizer.state_dict(), f)
        with open(tmp / "indices.npy", "wb") as f:
            np.save(f, np.ascontiguousarray(indices, dtype=np.int64))
        atomic_write_json(tmp / "state.json", {**state, "step": step})
        atomic_write_json(tmp / "config.json", {**config, "step": step})
        checksums = {name: sha256_file(tmp / name) for name in FILES}
        atomic_write_json(tmp / "checksums.json", checksums)
        for name in FILES:
            _fsync(tmp / name)
        if final.exists():  # re-saving the same step (e.g. train() called again without progress)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = "no space left on device" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
        keep = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise SmallTalkError(f"could not write checkpoint {final}: {reason}; {keep}; free disk space (or fix "
                             "the error) and re-run the same command to resume") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with contextlib.suppress(OSError):  # informational only: the newest step_* directory is the truth
        atomic_write_text(root / "latest", final.name + "\n")
    for _, old in list_checkpoints(root)[:-keep_last_k]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _corrupt(ckpt: Path, what: str) -> SmallTalkError:
    earlier = [p for _, p in list_checkpoints(ckpt.parent) if p.name < ckpt.name]
    fallback = f"resume from {earlier[-1].name}" if earlier else "start the run over"
    return SmallTalkError(f"{what}; the checkpoint is corrupt: delete {ckpt} to {fallback}")


def read_checkpoint_meta(ckpt: str | os.PathLike) -> tuple[dict, dict, np.ndarray]:
    """Verify checksums and read (config.json, state.json, indices) of checkpoint directory `ckpt`."""
    ckpt = Path(ckpt)
    sums_path = ckpt / "checksums.json"
    try:
        checksums = read_json(sums_path)
    except SmallTalkError as e:
        raise _corrupt(ckpt, str(e).split(";")[0]) from None
    for name in FILES:
        path = ckpt / name
        if not path.is_file():
            raise _corrupt(ckpt, f"{path}: file missing")
        if sha256_file(path) != checksums.get(name):
            raise _corrupt(ckpt, f"{path}: checksum mismatch")
    config, state = read_json(ckpt / "config.json"), read_json(ckpt / "state.json")
    try:
        indices = np.load(ckpt / "indices.npy", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise _corrupt(ckpt, f"{ckpt / 'indices.npy'}: unreadable ({e})") from None
    return config, state, indices


def check_compatible(ckpt: Path, config: dict, model_cfg: ModelConfig, tokenizer_sha256: str | None) -> None:
    """Refuse to resume a checkpoint written for another model config or tokenizer."""
    saved = ModelConfig.from_dict(config["model"])
    if saved != model_cfg:
        diff = {k: (v, getattr(model_cfg, k)) for k, v in saved.to_dict().items()
                if k != "name" and getattr(model_cfg, k) != v}
        raise SmallTalkError(f"{ckpt}: checkpoint was written for another model config "
                             f"(field: checkpoint vs now: {diff}); use the same model settings or a new --out "
                             "run directory")
    saved_tok = config.get("tokenizer_sha256")
    if saved_tok != tokenizer_sha256:
        raise SmallTalkError(f"{ckpt}: checkpoint was trained with tokenizer sha256 {str(saved_tok)[:12]}, the data "
                             f"now uses {str(tokenizer_sha256)[:12]}; use the original data directory or a new --out "
                             "run directory")


def load_checkpoint_weights(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            device: torch.device) -> None:
    """Load weights and optimizer state (call read_checkpoint_meta first: it verifies the files)."""
    try:
        load_weights(ckpt / "model.safetensors", model)
    except SmallTalkError as e:
        raise _corrupt(ckpt, str(e).split(";")[0]) from None
    try:
        opt_state = torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(opt_state)
    except (RuntimeError, ValueError, KeyError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise _corrupt(ckpt, f"{ckpt / 'optimizer.pt'}: unreadable optimizer state ({str(e).splitlines()[0]})") \
            from None


def rng_state() -> dict[str, Any]:
    """Python, NumPy (legacy global), torch CPU and CUDA generator states as JSON-able lists."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
