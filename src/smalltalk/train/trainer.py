"""The training loop shared by routers, experts and the dense baseline.

    trainer = Trainer(model_cfg, train_cfg, train_data, run_dir, valid_data=..., indices=...)
    trainer.train()                  # to train_cfg.max_steps; writes <run_dir>/model/ at the end

Construction resumes from the newest checkpoint in ``<run_dir>/checkpoints/`` (weights, AdamW
state, data position, RNG states), so re-running the same command after a crash continues the
same trajectory: the per-step losses and the final weights equal those of an uninterrupted run.

Index sets and EM. `indices` are the training sequences this model draws from (an expert's
segment, a router's EM segment; default: the whole split). A checkpoint stores the index set it
was using, and resuming restores it. To continue a model on a new set with its optimizer state
carried over (the EM loop for routers, paper Alg. 1)::

    trainer = Trainer(router_cfg, router_train_cfg, data, run_dir, indices=segment_0)
    for it in range(num_iterations):
        trainer.set_indices(segment[it])          # no-op (keeps the position) if it is the current set
        trainer.train(until_step=(it + 1) * steps_per_iteration)   # checkpoints at the end of each call
        ... score, reassign ...

After a crash, rebuilding the Trainer resumes at the last checkpoint; ``trainer.step`` says which
iteration that is, and calling set_indices with that iteration's segment keeps the saved position.

Steps. `step` counts completed optimizer steps. Each takes ``batch_size`` sequences from the
sampler (global over ranks and micro-steps), trains on the first ``loss_prefix_len`` tokens when
set (Eq. 9), clips the global gradient norm and applies AdamW at ``lr_at(step)``. A non-finite loss
or gradient norm stops training with a SmallTalkError naming the step; nothing is saved after it,
so the last good checkpoint stays the newest.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.shards import TokenDataset
from ..data.splits import SplitData, evenly_spaced
from ..errors import SmallTalkError
from ..io import atomic_write_bytes, atomic_write_json
from ..model.config import ModelConfig
from ..model.flops import training_flops_per_step
from ..model.io import CONFIG_FILE, save_model_dir, sha256_file
from ..model.transformer import Transformer
from . import checkpoint as ckpt_lib
from .config import TrainConfig
from .layout import TrainerDir
from .distributed import DistInfo, any_rank, barrier, init_distributed, resolve_device
from .evaluate import EvalResult, autocast_context, evaluate
from .metrics import MetricsLogger
from .optim import build_optimizer, lr_at, set_lr
from .sampler import Sampler

# Train-config fields that may change between a run and its resumption without altering what was
# already trained (extending a run, logging cadence, the device it runs on).
_RESUMABLE_CHANGES = {"max_steps", "eval_every", "eval_batches", "checkpoint_every", "keep_last_k", "log_every",
                      "device", "compile", "name"}


def _as_dataset(data: TokenDataset | SplitData | None) -> tuple[TokenDataset | None, float | None]:
    if isinstance(data, SplitData):
        return data.dataset, data.bytes_per_token
    return data, None


class Trainer:
    """One model, one run directory. See the module docstring for the resume and EM contract."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, train_data: TokenDataset | SplitData,
                 run_dir: str | Path, *, valid_data: TokenDataset | SplitData | None = None,
                 indices: np.ndarray | None = None, tokenizer_file: str | Path | None = None,
                 tokenizer_sha256: str | None = None, resume: bool = True, progress: bool | None = None,
                 dist_info: DistInfo | None = None):
        self.model_cfg, self.cfg = model_cfg, train_cfg
        self.run_dir = Path(run_dir)
        self.ckpt_root = TrainerDir(self.run_dir).checkpoints
        if isinstance(train_data, SplitData):
            tokenizer_file = tokenizer_file or train_data.tokenizer_file
            tokenizer_sha256 = tokenizer_sha256 or train_data.tokenizer_sha256
        self.train_data, _ = _as_dataset(train_data)
        self.valid_data, self.valid_bytes_per_token = _as_dataset(valid_data)
        self.tokenizer_file = Path(tokenizer_file) if tokenizer_file else None
        if tokenizer_sha256 is None and self.tokenizer_file is not None:
            tokenizer_sha256 = sha256_file(self.tokenizer_file)
        self.tokenizer_sha256 = tokenizer_sha256
        self.dist = dist_info or init_distributed(train_cfg.device)
        self.device = resolve_device(train_cfg.device, self.dist)
        self.autocast_dtype = self._autocast_dtype()
        self.micro_batch = train_cfg.micro_batch_size(self.dist.world_size)
        self.seq_len = self._check_data()
        # Eq. 10 with S = the positions the model actually runs on (the sequence minus its last token).
        self.flops_per_step = training_flops_per_step(model_cfg, train_cfg.batch_size, self.seq_len - 1)
        self.tokens_per_step = train_cfg.batch_size * (self.seq_len - 1)

        torch.manual_seed(train_cfg.seed)  # identical init on every rank and every run with this seed
        self.model = Transformer(model_cfg).to(self.device)
        self.optimizer = build_optimizer(self.model, train_cfg, self.device)
        self.sampler = Sampler(self._check_indices(indices), seed=train_cfg.seed)
        self.step = 0
        self.tokens = 0
        self.flops = 0
        self.last_checkpoint_step: int | None = None
        self.last_eval: EvalResult | None = None
        self._valid_indices = None
        if self.valid_data is not None:
            count = train_cfg.eval_batches * train_cfg.batch_size
            self._valid_indices = evenly_spaced(len(self.valid_data), count)
        self.resumed_from: Path | None = None
        if resume:
            self._resume()
        self._snapshot_tokenizer()
        self._forward_model = self._wrap_model()
        self.logger: MetricsLogger | None = None
        self._progress = progress

    # ----------------------------------------------------------------------------- setup

    def _autocast_dtype(self) -> torch.dtype | None:
        precision = self.cfg.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        return torch.bfloat16 if precision == "bf16" else None

    def _check_data(self) -> int:
        data, cfg, mcfg = self.train_data, self.cfg, self.model_cfg
        if len(data) == 0:
            raise SmallTalkError("training split has no sequences; prepare more text or a shorter --seq-len")
        if data.vocab_size > mcfg.vocab_size:
            raise SmallTalkError(f"data vocabulary {data.vocab_size} is larger than the model's vocab_size "
                                 f"{mcfg.vocab_size}; build the model config with vocab_size={data.vocab_size}")
        seq_len = data.seq_len
        if cfg.loss_prefix_len is not None:
            if cfg.loss_prefix_len > data.seq_len:
                raise SmallTalkError(f"train config: loss_prefix_len={cfg.loss_prefix_len} is longer than the data's "
                                     f"sequences ({data.seq_len} tokens); lower it")
            seq_len = cfg.loss_prefix_len
        if seq_len - 1 > mcfg.max_seq_len:
            raise SmallTalkError(f"training sequences of {seq_len} tokens are longer than the model's context "
                                 f"(max_seq_len={mcfg.max_seq_len}); use max_seq_len >= {seq_len} or prepare data "
                                 "with a shorter --seq-len")
        if self.valid_data is not None and (self.valid_data.seq_len != data.seq_len
                                            or self.valid_data.vocab_size != data.vocab_size):
            raise SmallTalkError(f"validation data (seq_len {self.valid_data.seq_len}, vocab "
                                 f"{self.valid_data.vocab_size}) does not match the training data (seq_len "
                                 f"{data.seq_len}, vocab {data.vocab_size}); use splits of one prepared directory")
        return seq_len

    def _check_indices(self, indices: np.ndarray | None) -> np.ndarray:
        if indices is None:
            return np.arange(len(self.train_data), dtype=np.int64)
        indices = np.asarray(indices)
        if indices.ndim != 1 or len(indices) == 0:
            raise SmallTalkError(f"training indices must be a non-empty 1-D array, got shape {indices.shape}")
        if not np.issubdtype(indices.dtype, np.integer):
            raise SmallTalkError(f"training indices must be integers, got dtype {indices.dtype}")
        if indices.min() < 0 or indices.max() >= len(self.train_data):
            raise SmallTalkError(f"training indices must lie in [0, {len(self.train_data)}), got "
                                 f"[{indices.min()}, {indices.max()}]")
        return indices.astype(np.int64)

    def _snapshot_tokenizer(self) -> None:
        """Keep a copy of the tokenizer in the run directory, so the run (and its final model directory)
        does not depend on the data directory staying in place."""
        if self.tokenizer_file is None:
            return
        run_copy = TrainerDir(self.run_dir).tokenizer
        if self.dist.is_main and not (run_copy.is_file() and sha256_file(run_copy) == self.tokenizer_sha256):
            if not self.tokenizer_file.is_file():
                raise SmallTalkError(f"{self.tokenizer_file}: tokenizer file not found")
            atomic_write_bytes(run_copy, self.tokenizer_file.read_bytes())
        barrier(self.dist)
        self.tokenizer_file = run_copy

    def _wrap_model(self) -> torch.nn.Module:
        model: torch.nn.Module = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                            else None)
        if self.cfg.compile:
            model = torch.compile(model)
        return model

    def _config_json(self) -> dict[str, Any]:
        return {"model": self.model_cfg.to_dict(), "train": self.cfg.to_dict(),
                "tokenizer_sha256": self.tokenizer_sha256, "world_size": self.dist.world_size,
                # Results are bit-exact only at the same thread count (float reductions split differently).
                "torch_threads": torch.get_num_threads()}

    # ----------------------------------------------------------------------------- state

    def _resume(self) -> None:
        if self.dist.is_main:
            ckpt_lib.remove_partials(self.ckpt_root)
        ckpt = ckpt_lib.latest_checkpoint(self.ckpt_root)
        if ckpt is None:
            return
        config, state, indices = ckpt_lib.read_checkpoint_meta(ckpt)
        ckpt_lib.check_compatible(ckpt, config, self.model_cfg, self.tokenizer_sha256)
        changed = sorted(k for k, v in config.get("train", {}).items()
                         if k not in _RESUMABLE_CHANGES and getattr(self.cfg, k, v) != v)
        if changed and self.dist.is_main:
            print(f"warning: resuming {ckpt} with changed training settings {changed}; the run will differ from "
                  "an uninterrupted one", file=sys.stderr)
        if len(indices) and int(indices.max()) >= len(self.train_data):
            raise SmallTalkError(f"{ckpt}: its index set reaches sequence {int(indices.max())} but the training data "
                                 f"has {len(self.train_data)}; resume with the data it was trained on")
        ckpt_lib.load_checkpoint_weights(ckpt, self.model, self.optimizer, self.device)
        self.sampler.load_state_dict(state["sampler"], indices)
        ckpt_lib.set_rng_state(state["rng"])
        self.step, self.tokens, self.flops = int(state["step"]), int(state["tokens"]), int(state["flops"])
        self.last_checkpoint_step = self.step
        self.resumed_from = ckpt

    def set_indices(self, indices: np.ndarray) -> bool:
        """Train on a new index set from the next step on (optimizer state kept). Returns whether it changed."""
        return self.sampler.set_indices(self._check_indices(indices))

    # ----------------------------------------------------------------------------- one step

    def _micro_batches(self, batch_indices: np.ndarray):
        """This rank's micro-batches of one global batch: micro-step j, rank r takes slice j * world + r."""
        world, rank, micro = self.dist.world_size, self.dist.rank, self.micro_batch
        for j in range(self.cfg.grad_accum):
            start = (j * world + rank) * micro
            tokens = self.train_data.get(batch_indices[start:start + micro])[:, :self.seq_len]  # (b, S)
            yield j, torch.from_numpy(tokens).to(self.device, non_blocking=True)

    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns {"loss", "lr", "grad_norm"} (loss averaged over the global batch)."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        set_lr(self.optimizer, lr)
        batch_indices = self.sampler.next(cfg.batch_size)  # (batch_size,) global
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        for j, tokens in self._micro_batches(batch_indices):
            last = j == cfg.grad_accum - 1
            # Gradients are all-reduced only on the last micro-step of a step.
            sync = nullcontext() if last or not self.dist.enabled else self._forward_model.no_sync()
            with sync:
                with autocast_context(self.device, self.autocast_dtype):
                    _, loss = self._forward_model(tokens[:, :-1], tokens[:, 1:])
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
        loss_mean = loss_sum / cfg.grad_accum
        if self.dist.enabled:
            torch.distributed.all_reduce(loss_mean, op=torch.distributed.ReduceOp.AVG)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        loss_value, norm_value = loss_mean.item(), grad_norm.item()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            self.optimizer.zero_grad(set_to_none=True)
            last = (f"the last good checkpoint is {self.ckpt_root / ckpt_lib.step_dir_name(self.last_checkpoint_step)}"
                    if self.last_checkpoint_step is not None else "no checkpoint was written yet")
            raise SmallTalkError(f"training diverged at step {self.step + 1}: loss={loss_value}, grad_norm="
                                 f"{norm_value}; {last}; lower --lr or raise --warmup-steps, then delete newer "
                                 "checkpoints (if any) and re-run to resume")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += self.tokens_per_step
        self.flops += self.flops_per_step
        return {"loss": loss_value, "lr": lr, "grad_norm": norm_value}

    # ----------------------------------------------------------------------------- eval / save

    def evaluate(self) -> EvalResult | None:
        """Validation on the fixed evenly spaced subset (eval_batches x batch_size sequences)."""
        if self.valid_data is None:
            return None
        self.last_eval = evaluate(self.model, self.valid_data, self._valid_indices,
                                  batch_size=self.micro_batch * self.cfg.grad_accum, device=self.device,
                                  autocast_dtype=self.autocast_dtype, bytes_per_token=self.valid_bytes_per_token,
                                  prefix_len=self.cfg.loss_prefix_len, dist_info=self.dist)
        return self.last_eval

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes checkpoint `step`; every rank raises if that fails."""
        path, error = None, None
        if self.dist.is_main:
            try:
                path = ckpt_lib.save_checkpoint(
                    self.ckpt_root, self.step, self.model, self.optimizer, self.sampler.indices,
                    {"sampler": self.sampler.state_dict(), "rng": ckpt_lib.rng_state(), "tokens": self.tokens,
                     "flops": self.flops}, self._config_json(), self.cfg.keep_last_k)
            except SmallTalkError as e:
                error = e
        if any_rank(error is not None, self.dist, self.device):
            raise error or SmallTalkError("rank 0 could not write a checkpoint; see its error message")
        self.last_checkpoint_step = self.step
        return path

    def save_model(self, directory: str | Path | None = None) -> Path:
        """Write the current weights as a model directory (default ``<run_dir>/model``); rank 0 only."""
        directory = Path(directory) if directory is not None else TrainerDir(self.run_dir).model
        if self.dist.is_main:
            extra = {"train": self.cfg.to_dict(), "step": self.step, "tokens": self.tokens, "flops": self.flops}
            if self.last_eval is not None:
                extra["valid"] = self.last_eval.to_dict()
            save_model_dir(directory, self.model, self.tokenizer_file, extra=extra)
        barrier(self.dist)
        return directory

    # ----------------------------------------------------------------------------- loop

    def train(self, until_step: int | None = None) -> dict[str, Any]:
        """Train to `until_step` (default max_steps), checkpoint, and at max_steps write ``<run_dir>/model``.

        Returns a summary: step, last loss, tokens, flops, and the last validation result.
        """
        cfg = self.cfg
        target = cfg.max_steps if until_step is None else until_step
        if not 0 <= target <= cfg.max_steps:
            raise SmallTalkError(f"until_step={target} must be in [0, max_steps={cfg.max_steps}]")
        self.logger = MetricsLogger(self.run_dir, enabled=self.dist.is_main, start_step=self.step,
                                    total_steps=target, progress=self._progress)
        if self.resumed_from is not None:
            self.logger.write(f"resumed from {self.resumed_from} (step {self.step})")
            self.resumed_from = None
        last: dict[str, Any] = {}
        ran = self.step < target
        try:
            # tokens/s counts training steps only (not evaluation or checkpoint writes).
            window_time, window_tokens = 0.0, 0
            run_start = time.perf_counter()
            while self.step < target:
                step_start = time.perf_counter()
                last = self.train_step()
                window_time += time.perf_counter() - step_start
                window_tokens += self.tokens_per_step
                record: dict[str, Any] = {"step": self.step, **last, "tokens": self.tokens, "flops": self.flops}
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    self._add_eval(record)
                if self.step % cfg.log_every == 0 or self.step == target or "val_loss" in record:
                    record["tokens_per_s"] = window_tokens / max(window_time, 1e-9)
                    record["elapsed_s"] = time.perf_counter() - run_start
                    window_time, window_tokens = 0.0, 0
                    self.logger.log(record)
                self.logger.progress(self.step, loss=last["loss"], lr=last["lr"],
                                     tok_s=record.get("tokens_per_s", 0.0))
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
            if self.last_checkpoint_step != self.step:
                self.save_checkpoint()
            # Finish the run once: a finished run re-launched only re-creates a missing model directory.
            if self.step >= cfg.max_steps and (ran or not (TrainerDir(self.run_dir).model / CONFIG_FILE).is_file()):
                if self.valid_data is not None and (self.last_eval is None or not cfg.eval_every
                                                    or self.step % cfg.eval_every):
                    self.logger.log(self._add_eval({"step": self.step}))
                self.save_model()
                if self.dist.is_main:
                    atomic_write_json(TrainerDir(self.run_dir).summary, self.summary())
        finally:
            self.logger.close()
        return self.summary(last.get("loss"))

    def _add_eval(self, record: dict[str, Any]) -> dict[str, Any]:
        result = self.evaluate()
        if result is not None:
            record.update(val_loss=result.loss, val_ppl=result.ppl)
            if result.bpb is not None:
                record["val_bpb"] = result.bpb
        return record

    def summary(self, loss: float | None = None) -> dict[str, Any]:
        return {"step": self.step, "loss": loss, "tokens": self.tokens, "flops": self.flops,
                "valid": self.last_eval.to_dict() if self.last_eval else None,
                "model": self.model_cfg.to_dict(), "train": self.cfg.to_dict(),
                "tokenizer_sha256": self.tokenizer_sha256, "world_size": self.dist.world_size}



def model_config_for_data(model_cfg: ModelConfig, data: TokenDataset | SplitData) -> ModelConfig:
    """The preset adapted to a token dataset: its vocabulary, and a context of its sequence length."""
    dataset, _ = _as_dataset(data)
    return model_cfg.replace(vocab_size=dataset.vocab_size, max_seq_len=dataset.seq_len)
