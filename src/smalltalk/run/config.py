"""Configuration of a whole SmallTalk run (`smalltalk run --config PRESET_OR_YAML`) and its presets.

A run is: prepare data -> router EM -> shard -> E experts -> dense baseline -> bundle -> evaluate
-> report. `RunConfig` gathers the typed configs of those stages; each section is "a preset of that
stage plus overrides". A YAML file looks like::

    preset: tiny            # optional: start from a run preset, then override below
    name: my-run
    seed: 0
    num_experts: 4          # E, for routers, shards and experts
    prefix_len: 32          # M, the routing prefix (routers train and score on it)
    data:         {preset: tiny, max_docs_per_domain: 100}    # smalltalk.data.prepare_config.PrepareConfig
    routers:      {preset: tiny, iterations: 4}                # smalltalk.routing.config.RouterEMConfig
    expert_model: {preset: tiny, hidden_size: 96}              # smalltalk.model.config.ModelConfig
    expert_train: {preset: tiny, max_steps: 300}               # smalltalk.train.config.TrainConfig
    eval:         {max_seqs: 400, prefix_lens: [8, 16]}        # smalltalk.mixture.evaluate.EvalConfig

The dense baseline has the expert architecture and sees as many tokens as all experts together, so it
costs the same training FLOPs. By default it follows the paper's protocol (Table 2): the experts' steps
at E x their batch, with their learning rate. A `dense:` section (`DenseSettings`) tunes it at equal
FLOPs instead: another (batch, steps) pair with the same tokens, its own learning rate::

    dense: {batch_size: 16, max_steps: 8000, lr: 0.005}   # 16 x 8000 = 4 experts x 64 x 500 sequences

Split training (`seed_fraction: f`, `SplitPlan`): a dense *seed*, the dense baseline's own first f of its
steps on the unrouted data, then each expert branches from it and trains the remaining 1 - f of its budget
on its shard, continuing its schedule where the seed stopped (no re-warm-up). Tokens, hence FLOPs, stay
equal to the dense model's; f = 0 is the pure mixture.

The saved form (`to_dict`, ``<run>/run_config.json``) is fully
resolved, so a run directory records exactly what it ran.

`seed` fixes everything: router EM (assignments, router init), expert k's init and data order
(seed + 1 + k) and the dense model's (seed).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config_dict import DictConfig, check_field_types, check_known_keys
from ..data.prepare_config import PrepareConfig
from ..errors import SmallTalkError
from ..model.config import PRESETS as MODEL_PRESETS
from ..model.config import ModelConfig
from ..routing.config import ROUTER_EM_PRESETS, RouterEMConfig
from ..train.config import TRAIN_PRESETS, TrainConfig
from ..mixture.evaluate import EvalConfig


@dataclass
class DenseSettings(DictConfig):
    """How the dense baseline trains; every unset field follows the paper's protocol (the experts' steps at
    E x their batch, their learning rate). Tokens stay equal to the experts' (hence FLOPs: same
    architecture), so setting one of batch_size / max_steps derives the other."""

    config_kind = "run config: dense"

    batch_size: int | None = None
    """Sequences per optimizer step (default: E x the experts' batch)."""
    max_steps: int | None = None
    """Optimizer steps (default: the experts' steps)."""
    lr: float | None = None
    """Peak learning rate (default: the experts')."""
    warmup_steps: int | None = None
    """Warm-up steps (default: the experts' warm-up, scaled by max_steps / the experts' steps)."""

    def __post_init__(self) -> None:
        check_field_types(self, self.config_kind)
        for key in ("batch_size", "max_steps"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise SmallTalkError(f"run config: dense.{key}={value!r} must be a positive integer")
        if self.lr is not None and not self.lr > 0:
            raise SmallTalkError(f"run config: dense.lr={self.lr!r} must be positive")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise SmallTalkError(f"run config: dense.warmup_steps={self.warmup_steps!r} must be >= 0")

    def is_default(self) -> bool:
        return all(getattr(self, f.name) is None for f in dataclasses.fields(self))

    def resolve(self, expert: TrainConfig, num_experts: int) -> TrainConfig:
        """The dense TrainConfig: as many training sequences as `num_experts` experts of `expert`."""
        total = num_experts * expert.batch_size * expert.max_steps
        batch, steps = self.batch_size, self.max_steps
        if batch is None and steps is None:
            batch, steps = num_experts * expert.batch_size, expert.max_steps
        elif steps is None:
            steps = total // batch
        elif batch is None:
            batch = total // steps
        if batch * steps != total:
            raise SmallTalkError(
                f"run config: dense batch_size x max_steps = {batch} x {steps} = {batch * steps} sequences, but the "
                f"{num_experts} experts train on {num_experts} x {expert.batch_size} x {expert.max_steps} = {total}; "
                f"the dense baseline must see as many tokens (equal FLOPs): choose a batch_size that divides {total}")
        dense = expert.rescaled(steps, batch_size=batch, lr=self.lr if self.lr is not None else expert.lr)
        return dense if self.warmup_steps is None else dense.replace(warmup_steps=self.warmup_steps)


@dataclass(frozen=True)
class SplitPlan:
    """Where split training branches: the seed is the dense run's first `seed_steps` steps (of its batch), and
    each expert starts at its own step `expert_start`, so seed + experts see the dense model's tokens."""

    fraction: float
    seed_steps: int
    expert_start: int

    @staticmethod
    def of(fraction: float, dense: TrainConfig, expert: TrainConfig, num_experts: int) -> "SplitPlan":
        seed_steps = round(fraction * dense.max_steps)
        seed_seqs = seed_steps * dense.batch_size
        per_expert_step = num_experts * expert.batch_size
        if abs(seed_steps - fraction * dense.max_steps) > 1e-6 * dense.max_steps or seed_seqs % per_expert_step:
            grain = math.lcm(dense.batch_size, per_expert_step) // dense.batch_size  # seed steps per whole expert step
            ok = [g / dense.max_steps for g in range(grain, dense.max_steps, grain)]
            near = sorted(ok, key=lambda x: abs(x - fraction))[:3]
            raise SmallTalkError(
                f"run config: seed_fraction={fraction!r} does not split the budget into whole steps (dense "
                f"{dense.max_steps} steps x batch {dense.batch_size}, experts {num_experts} x batch {expert.batch_size}); "
                f"use a multiple of {grain}/{dense.max_steps}" + (f", e.g. {', '.join(f'{x:g}' for x in sorted(near))}"
                                                                   if near else ""))
        return SplitPlan(fraction, seed_steps, seed_seqs // per_expert_step)


def _section(kind: str, value: Any, presets: dict, cls) -> Any:
    """A section given as a config object, a preset name, or a dict {"preset": name, **overrides}."""
    try:
        return _build_section(kind, value, presets, cls)
    except SmallTalkError as e:
        message = str(e)
        raise SmallTalkError(message if message.startswith("run config") else f"run config: {kind}: {message}") from None


def _build_section(kind: str, value: Any, presets: dict, cls) -> Any:
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        value = {"preset": value}
    if not isinstance(value, dict):
        raise SmallTalkError(f"run config: {kind} must be a preset name or a mapping, got {value!r}")
    value = dict(value)
    name = value.pop("preset", None)
    if name is not None:
        if name not in presets:
            raise SmallTalkError(f"run config: {kind}.preset={name!r} is unknown; choose one of {', '.join(presets)}")
        base = presets[name]
        if hasattr(cls, "from_dict"):  # the section's own reader: it drops keys its saved form derives
            return cls.from_dict({**base.to_dict(), **value})
        check_known_keys(cls, value, f"run config: {kind}")
        return dataclasses.replace(base, **value)
    return cls.from_dict(value) if hasattr(cls, "from_dict") else cls(**value)


def _data_section(value: Any):
    from ..data.prepare_config import PREPARE_PRESETS

    return _section("data", value, PREPARE_PRESETS, PrepareConfig)


@dataclass
class RunConfig:
    """Each stage section is given as its config, a preset name of that stage or {"preset": ..., **overrides};
    after construction every section is its typed config."""

    name: str = "custom"
    """Run name (informational; shown in the report)."""
    seed: int = 0
    """Fixes every stage (see module docstring)."""
    num_experts: int = 4
    """E: routers, data shards and experts."""
    prefix_len: int = 64
    """M: routing prefix length in tokens (routers train on it; sharding and inference route on it)."""
    data: PrepareConfig | str | dict = "tiny"
    """`PrepareConfig`, a preset name of `smalltalk.data.prepare_config.PREPARE_PRESETS`, or {"preset": ..., **overrides}."""
    routers: RouterEMConfig | str | dict = "tiny"
    """`RouterEMConfig` (its num_experts / prefix_len / seed are set from this config)."""
    expert_model: ModelConfig | str | dict = "tiny"
    """`ModelConfig` of every expert and of the dense baseline; vocabulary and context come from the data."""
    expert_train: TrainConfig | str | dict = "tiny"
    """`TrainConfig` of one expert; batch_size is per expert (paper: 128)."""
    eval: EvalConfig | dict = field(default_factory=EvalConfig)
    """`EvalConfig` of the mixture evaluation (test split)."""
    domains: list[str] = field(default_factory=list)
    """Use only these domain files of the corpus (``<split>/<domain>.jsonl.gz``); empty: the whole corpus."""
    valid_seqs: int = 2048
    """Valid sequences routed to give each expert a validation segment (evenly spaced; 0: the whole split)."""
    dense: DenseSettings | dict = field(default_factory=DenseSettings)
    """How the dense baseline trains at equal FLOPs (`DenseSettings`; default: the paper's protocol)."""
    seed_fraction: float = 0.0
    """Split training: the share of the training budget spent on a dense seed the experts branch from (0: pure
    mixture, every expert from scratch; see `SplitPlan`)."""
    dense_grad_accum: int = 1
    """Micro-steps of the dense baseline's E x batch (memory only; the optimization is the same)."""
    device: str = "auto"
    """Device of every stage: "auto" (cuda when available), "cpu", "cuda"."""

    def __post_init__(self) -> None:
        if isinstance(self.domains, str) or not all(isinstance(d, str) and d for d in self.domains):
            raise SmallTalkError(f"run config: domains={self.domains!r} must be a list of domain names")
        self.domains = list(self.domains)
        if not isinstance(self.valid_seqs, int) or self.valid_seqs < 0:
            raise SmallTalkError(f"run config: valid_seqs={self.valid_seqs!r} must be a non-negative integer")
        for key in ("num_experts", "prefix_len", "dense_grad_accum"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SmallTalkError(f"run config: {key}={value!r} must be a positive integer")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise SmallTalkError(f"run config: seed={self.seed!r} must be a non-negative integer")
        if self.num_experts < 2:
            raise SmallTalkError(f"run config: num_experts={self.num_experts}; a mixture needs at least 2 experts")
        self.data = _data_section(self.data)
        self.routers = _section("routers", self.routers, ROUTER_EM_PRESETS, RouterEMConfig).replace(
            num_experts=self.num_experts, prefix_len=self.prefix_len, seed=self.seed, device=self.device)
        self.expert_model = _section("expert_model", self.expert_model, MODEL_PRESETS, ModelConfig)
        self.expert_train = _section("expert_train", self.expert_train, TRAIN_PRESETS, TrainConfig).replace(
            seed=self.seed, device=self.device)
        if isinstance(self.eval, dict):
            self.eval = EvalConfig(**self.eval)
        elif not isinstance(self.eval, EvalConfig):
            raise SmallTalkError(f"run config: eval must be a mapping, got {self.eval!r}")
        self.eval.device = self.device
        if isinstance(self.dense, dict):
            self.dense = DenseSettings.from_dict(self.dense)
        elif not isinstance(self.dense, DenseSettings):
            raise SmallTalkError(f"run config: dense must be a mapping (batch_size, max_steps, lr, warmup_steps), "
                                 f"got {self.dense!r}")
        if self.expert_train.loss_prefix_len is not None:
            raise SmallTalkError("run config: expert_train.loss_prefix_len must be unset: experts train on whole "
                                 "sequences (Eq. 1)")
        if self.prefix_len > self.data.seq_len:  # checked before any stage runs, not after prepare
            raise SmallTalkError(f"run config: prefix_len={self.prefix_len} is longer than the data's sequences "
                                 f"(data.seq_len={self.data.seq_len}); use a prefix of at most {self.data.seq_len} "
                                 "tokens or a longer seq_len")
        if any(m > self.prefix_len for m in self.eval.prefix_lens):
            raise SmallTalkError(f"run config: eval.prefix_lens={self.eval.prefix_lens} must be <= prefix_len="
                                 f"{self.prefix_len} (routers only score M tokens)")
        if not isinstance(self.seed_fraction, (int, float)) or isinstance(self.seed_fraction, bool) \
                or not 0 <= self.seed_fraction < 1:
            raise SmallTalkError(f"run config: seed_fraction={self.seed_fraction!r} must be a number in [0, 1) (0: "
                                 "every expert from scratch; 0.5: half the budget on the shared dense seed)")
        # The dense batch must split into its micro-steps, and the seed into whole steps.
        self.dense_train()
        self.split()

    # -- derived ----------------------------------------------------------------------------------

    def expert_train_config(self, expert: int) -> TrainConfig:
        return self.expert_train.replace(seed=self.seed + 1 + expert, name=f"{self.name}-expert-{expert}")

    def dense_train(self) -> TrainConfig:
        """As many tokens as all experts (equal FLOPs): paper Table 2 (same steps, E x the batch) unless `dense`
        says otherwise."""
        return self.dense.resolve(self.expert_train, self.num_experts).replace(
            grad_accum=self.dense_grad_accum, seed=self.seed, name=f"{self.name}-dense")

    def split(self) -> SplitPlan | None:
        """The seed and branch steps of split training (None when seed_fraction is 0)."""
        if not self.seed_fraction:
            return None
        return SplitPlan.of(float(self.seed_fraction), self.dense_train(), self.expert_train, self.num_experts)

    def seed_train(self) -> TrainConfig:
        """The seed's TrainConfig: the dense baseline's, so the seed is the dense run's first steps."""
        return self.dense_train().replace(name=f"{self.name}-seed")

    # -- (de)serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict:
        data = self.data.to_dict() if hasattr(self.data, "to_dict") else dataclasses.asdict(self.data)
        # The paper's protocol is written as no `dense` key, so run directories started before it existed resume.
        dense = {} if self.dense.is_default() else {"dense": self.dense.to_dict()}
        if self.seed_fraction:  # likewise: pure-mixture configs are saved as before split training existed
            dense["seed_fraction"] = self.seed_fraction
        return {**dense, "name": self.name, "seed": self.seed, "num_experts": self.num_experts, "prefix_len": self.prefix_len,
                "device": self.device, "domains": list(self.domains), "valid_seqs": self.valid_seqs, "dense_grad_accum": self.dense_grad_accum, "data": data,
                "routers": self.routers.to_dict(), "expert_model": self.expert_model.to_dict(),
                "expert_train": self.expert_train.to_dict(), "eval": dataclasses.asdict(self.eval)}

    @classmethod
    def from_dict(cls, d: dict, _chain: tuple[str, ...] = ()) -> "RunConfig":
        d = dict(d)
        base = d.pop("preset", None)
        check_known_keys(cls, d, "run config")
        if base is None:
            return cls(**d)
        if base not in RUN_PRESETS:
            raise SmallTalkError(f"run config: preset={base!r} is unknown; choose one of {', '.join(RUN_PRESETS)}"
                                 + _e_variant_hint(base))
        if base in _chain:  # presets built on presets must end in one that is built on none
            raise SmallTalkError(f"run presets build on each other in a cycle: {' -> '.join(_chain + (base,))}")
        merged = RUN_PRESETS[base]()
        if "preset" in merged:  # a preset built on another one (cpu-tuned on cpu): resolve that one first
            merged = cls.from_dict(merged, _chain + (base,)).to_dict()
        for key, value in d.items():
            old = merged.get(key)
            if isinstance(old, dict) and isinstance(value, dict):
                # A section override keeps the preset section's own preset unless it names another one.
                value = {**old, **value} if "preset" not in value else value
            elif isinstance(old, str) and isinstance(value, dict) and key != "name" and "preset" not in value:
                value = {"preset": old, **value}
            merged[key] = value
        return cls(**merged)

    def describe(self) -> str:
        dense, split = self.dense_train(), self.split()
        seed = (f"; split at f={split.fraction:g}: seed = dense steps 1-{split.seed_steps}, experts continue from "
                f"step {split.expert_start}" if split else "")
        return (f"{self.name}: E={self.num_experts}, M={self.prefix_len}; routers {self.routers.describe()}; "
                f"experts {self.expert_model.name} {self.expert_train.describe()}; dense "
                f"{dense.max_steps} steps x batch {dense.batch_size}, lr {dense.lr:g}{seed}")


PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
"""The run presets: one YAML file each (``smalltalk/presets/<name>.yaml``), copyable as a starting point. (The
repository's top-level ``recipes/`` holds scripts and example lm-eval tasks, not presets.)"""


def _read_recipe(path: Path) -> dict:
    import yaml

    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise SmallTalkError(f"{path}: a run preset must be a YAML mapping")
    return raw


RUN_PRESETS: dict[str, Any] = {p.stem: (lambda p=p: _read_recipe(p))  # tiny first, then by name
                               for p in sorted(PRESETS_DIR.glob("*.yaml"), key=lambda p: (p.stem != "tiny", p.stem))}


def _e_variant_hint(name: str) -> str:
    """Presets once had one name per number of experts (cpu-e8, paper-335m-e4): point at the base preset."""
    import re

    m = re.fullmatch(r"(.+)-e(\d+)", str(name))
    if m and m.group(1) in RUN_PRESETS:
        return f" (for {m.group(2)} experts use preset {m.group(1)!r} with num_experts: {m.group(2)} / --num-experts)"
    return ""


def run_preset(preset: str, **overrides) -> RunConfig:
    """The named run preset with top-level `overrides` (e.g. ``num_experts=2``, ``name=...``)."""
    if preset not in RUN_PRESETS:
        raise SmallTalkError(f"unknown run preset {preset!r}{_e_variant_hint(preset)}; choose one of "
                             f"{', '.join(RUN_PRESETS)} or give a YAML file")
    return RunConfig.from_dict({"preset": preset, **{k: v for k, v in overrides.items() if v is not None}})


# A YAML without `preset:` must give these itself.
_UNPRESET_KEYS = ("num_experts", "prefix_len", "data", "routers", "expert_model", "expert_train")


def load_run_config(spec: str | Path, **overrides) -> RunConfig:
    """A preset name or a YAML/JSON file path -> RunConfig."""
    path = Path(spec)
    if str(spec) in RUN_PRESETS and not path.is_file():
        return run_preset(str(spec), **overrides)
    if not path.is_file():
        moved = PRESETS_DIR / path.name
        if "recipes" in path.parts and moved.is_file():  # the presets' folder was called recipes/ before
            raise SmallTalkError(f"--config {spec}: the run presets moved to {moved} (use `--config {path.stem}`, or copy "
                                 "that file)")
        raise SmallTalkError(f"--config {spec}: neither a run preset ({', '.join(RUN_PRESETS)}) nor a file"
                             + _e_variant_hint(str(spec)))
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            import json

            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as e:  # yaml / json syntax errors: name the file
        raise SmallTalkError(f"{path}: cannot parse the run config ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise SmallTalkError(f"{path}: a run config must be a mapping of keys (name, num_experts, data, ...)")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    unset = [k for k in _UNPRESET_KEYS if k not in raw]
    if "preset" not in raw and unset:
        raise SmallTalkError(f"{path}: no `preset:` line and no {', '.join(unset)}: those would silently take "
                             f"built-in defaults; add `preset: tiny` (or {', '.join(p for p in RUN_PRESETS if p != 'tiny')}) "
                             "to start from a run preset, or give every one of them")
    try:
        return RunConfig.from_dict(raw)
    except TypeError as e:
        raise SmallTalkError(f"{path}: {e}") from None
