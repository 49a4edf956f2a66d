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

The dense baseline is derived, never configured apart (paper Table 2): the expert architecture,
the same number of steps, E x the expert batch, so it sees as many tokens as all experts together
and costs the same training FLOPs. The saved form (`to_dict`, ``<run>/run_config.json``) is fully
resolved, so a run directory records exactly what it ran.

`seed` fixes everything: router EM (assignments, router init), expert k's init and data order
(seed + 1 + k) and the dense model's (seed).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config_dict import check_known_keys
from ..errors import SmallTalkError
from ..model.config import PRESETS as MODEL_PRESETS
from ..model.config import ModelConfig
from ..routing.config import ROUTER_EM_PRESETS, RouterEMConfig
from ..train.config import TRAIN_PRESETS, TrainConfig
from .evaluate import EvalConfig


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
        check_known_keys(cls, value, f"run config: {kind}")
        return dataclasses.replace(base, **value)
    return cls.from_dict(value) if hasattr(cls, "from_dict") else cls(**value)


def _data_section(value: Any):
    from ..data.prepare_config import PREPARE_PRESETS, PrepareConfig

    return _section("data", value, PREPARE_PRESETS, PrepareConfig)


@dataclass
class RunConfig:
    name: str = "custom"
    """Run name (informational; shown in the report)."""
    seed: int = 0
    """Fixes every stage (see module docstring)."""
    num_experts: int = 4
    """E: routers, data shards and experts."""
    prefix_len: int = 64
    """M: routing prefix length in tokens (routers train on it; sharding and inference route on it)."""
    data: Any = "tiny"
    """`PrepareConfig`, a preset name of `smalltalk.data.prepare_config.PREPARE_PRESETS`, or {"preset": ..., **overrides}."""
    routers: Any = "tiny"
    """`RouterEMConfig` (its num_experts / prefix_len / seed are set from this config)."""
    expert_model: Any = "tiny"
    """`ModelConfig` of every expert and of the dense baseline; vocabulary and context come from the data."""
    expert_train: Any = "tiny"
    """`TrainConfig` of one expert; batch_size is per expert (paper: 128)."""
    eval: Any = field(default_factory=EvalConfig)
    """`EvalConfig` of the mixture evaluation (test split)."""
    domains: list[str] = field(default_factory=list)
    """Use only these domain files of the corpus (``<split>/<domain>.jsonl.gz``); empty: the whole corpus."""
    valid_seqs: int = 2048
    """Valid sequences routed to give each expert a validation segment (evenly spaced; 0: the whole split)."""
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
        # The dense batch must split into its micro-steps.
        self.dense_train()

    # -- derived ----------------------------------------------------------------------------------

    def expert_train_config(self, expert: int) -> TrainConfig:
        return self.expert_train.replace(seed=self.seed + 1 + expert, name=f"{self.name}-expert-{expert}")

    def dense_train(self) -> TrainConfig:
        """Paper Table 2: same steps, E x the batch, so the dense model sees as many tokens as all experts."""
        return self.expert_train.replace(batch_size=self.num_experts * self.expert_train.batch_size,
                                         grad_accum=self.dense_grad_accum, seed=self.seed, name=f"{self.name}-dense")

    # -- (de)serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict:
        data = self.data.to_dict() if hasattr(self.data, "to_dict") else dataclasses.asdict(self.data)
        return {"name": self.name, "seed": self.seed, "num_experts": self.num_experts, "prefix_len": self.prefix_len,
                "device": self.device, "domains": list(self.domains), "valid_seqs": self.valid_seqs, "dense_grad_accum": self.dense_grad_accum, "data": data,
                "routers": self.routers.to_dict(), "expert_model": self.expert_model.to_dict(),
                "expert_train": self.expert_train.to_dict(), "eval": dataclasses.asdict(self.eval)}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        d = dict(d)
        base = d.pop("preset", None)
        check_known_keys(cls, d, "run config")
        if "routers" in d and isinstance(d["routers"], dict):
            d["routers"] = {k: v for k, v in d["routers"].items() if k != "num_seqs_resolved"}
        if base is None:
            return cls(**d)
        if base not in RUN_PRESETS:
            raise SmallTalkError(f"run config: preset={base!r} is unknown; choose one of {', '.join(RUN_PRESETS)}")
        merged = RUN_PRESETS[base]()
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
        return (f"{self.name}: E={self.num_experts}, M={self.prefix_len}; routers {self.routers.describe()}; "
                f"experts {self.expert_model.name} {self.expert_train.describe()}; dense batch "
                f"{self.dense_train().batch_size}")


def _tiny() -> dict:
    # The README quickstart: minutes on 2 CPU cores, mixture 12.4% below dense (benchmarks/results/
    # mixture_results_tiny.md). Experts are capacity-starved (`micro`: 16 wide, one layer, 512-token
    # vocabulary) so that specialisation shows within 200 steps; routers are `tiny` and route on M = 64 of
    # the 128 tokens. The routers are bigger than the experts, so the FLOPs table shows a large routing
    # overhead here; the `cpu` presets have paper-like ones.
    return {"name": "tiny", "num_experts": 4, "prefix_len": 64, "valid_seqs": 1024,
            "data": {"preset": "tiny", "vocab_size": 512},
            "routers": {"preset": "tiny", "iterations": 6, "steps_per_iteration": 40, "batch_size": 16},
            "expert_model": {"preset": "micro"},
            "expert_train": {"preset": "tiny", "lr": 0.01, "max_steps": 200, "batch_size": 64, "warmup_steps": 10,
                             "eval_every": 25, "eval_batches": 4, "checkpoint_every": 100},
            "eval": {"max_seqs": 512, "prefix_lens": [8, 16, 32], "top_k": 2}}


def _cpu(num_experts: int) -> dict:
    # The FLOP-fair experiment of benchmarks/mixture_results.py: equal training FLOPs with the
    # routers counted, and inference within +10% of dense. On 2 CPU cores that means small models: experts
    # of `mini` shape at 32 wide (42k parameters, ~200 training tokens per parameter, the overtrained regime
    # of the paper's experts) and `nano` routers (5k) on a 32-token prefix: E = 4 adds +4% inference FLOPs.
    # A 512-token vocabulary keeps the output head, which no router can share, from dominating both. The
    # first 6 MB of each corpus file (~60 MB of text, all 10 domains). Measured at E = 4: mixture 11.7% below
    # dense, every expert below dense on its segment (benchmarks/results/mixture_results.md).
    return {"name": f"cpu-e{num_experts}", "num_experts": num_experts, "prefix_len": 32, "valid_seqs": 2048,
            "data": {"preset": "cpu", "vocab_size": 512, "tokenizer_sample_bytes": 4_000_000,
                     "max_bytes_per_file": 6_000_000},
            "routers": {"preset": "cpu", "router_preset": "nano", "iterations": 6, "steps_per_iteration": 80,
                        "batch_size": 64, "lr": 0.01, "warmup_steps": 20},
            "expert_model": {"preset": "mini", "hidden_size": 32},
            "expert_train": {"preset": "cpu-small", "lr": 0.01, "max_steps": 500, "batch_size": 64,
                             "warmup_steps": 20, "eval_every": 50, "eval_batches": 4, "checkpoint_every": 100},
            "eval": {"max_seqs": 4096, "prefix_lens": [8, 16], "top_k": 2}}


def _cpu_small(num_experts: int) -> dict:
    # `cpu-small` experts (5.3M) and `cpu-router` routers on the whole corpus (8192-token vocabulary):
    # far fewer tokens per parameter than the paper (~0.4 at 500 steps): hours on 2 CPU cores; the base of
    # `cpu-long`.
    return {"name": f"cpu-small-e{num_experts}", "num_experts": num_experts, "prefix_len": 48, "data": {"preset": "cpu"},
            "routers": {"preset": "cpu"}, "expert_model": {"preset": "cpu-small"},
            "expert_train": {"preset": "cpu-small"}, "eval": {"max_seqs": 4096, "prefix_lens": [8, 16, 32], "top_k": 2}}


def _cpu_long(num_experts: int) -> dict:
    # The same models trained ~16x longer (batch 64 x 6000 steps per expert: ~100M tokens each, ~8 epochs of
    # the corpus for the dense model): for a GPU, where the small models reach the data-rich regime in which
    # the paper compares (hundreds of tokens per parameter); ~20-40 min on one H100.
    cfg = _cpu_small(num_experts)
    cfg.update(name=f"cpu-long-e{num_experts}", expert_train={
        "preset": "cpu-small", "batch_size": 64, "max_steps": 6000, "warmup_steps": 300, "eval_every": 500,
        "eval_batches": 8, "checkpoint_every": 500})
    cfg["routers"] = {"preset": "cpu", "iterations": 10, "steps_per_iteration": 200, "batch_size": 32}
    return cfg


def _cpu_medium(num_experts: int) -> dict:
    # Experts of the dense `cpu-small` model (5.3M parameters; phrase-level fluent after 12M tokens) on the whole
    # sample corpus (59.5M tokens, 8192-token vocabulary): 1,800 steps x 16 x 256 per expert, so the experts
    # together and the dense model (same steps, E x the batch) each see ~29M tokens, half an epoch, nothing
    # repeated. `cpu-router-s` routers on a 32-token prefix: +3% inference FLOPs at E = 4. About 4-5 hours on
    # 2 CPU cores, resumable stage by stage (`python benchmarks/mixture_results.py --preset cpu-medium`).
    return {"name": f"cpu-medium-e{num_experts}", "num_experts": num_experts, "prefix_len": 32, "valid_seqs": 2048,
            "data": {"preset": "cpu"},
            "routers": {"preset": "cpu", "router_preset": "cpu-router-s", "iterations": 6, "steps_per_iteration": 150,
                        "batch_size": 32, "lr": 0.003, "warmup_steps": 30},
            "expert_model": {"preset": "cpu-small"},
            "expert_train": {"preset": "cpu-small", "max_steps": 1800, "batch_size": 16, "warmup_steps": 100,
                             "eval_every": 200, "eval_batches": 8, "checkpoint_every": 100},
            "eval": {"max_seqs": 4096, "prefix_lens": [8, 16], "top_k": 2}}


def _paper_335m(num_experts: int) -> dict:
    # Paper §3.1 / Tables 1-2: 335M experts, batch 128, 256k steps, 4.4M routers, M = 256.
    return {"name": f"paper-335m-e{num_experts}", "num_experts": num_experts, "prefix_len": 256,
            "data": {"preset": "paper"}, "routers": {"preset": "paper"}, "expert_model": {"preset": "expert-335m"},
            "expert_train": {"preset": "paper-expert"}, "dense_grad_accum": 4,
            "eval": {"max_seqs": 20000, "prefix_lens": [32, 64, 128], "top_k": 2, "batch_size": 8}}


RUN_PRESETS: dict[str, Any] = {
    "tiny": _tiny,
    "cpu": lambda: _cpu(4),
    "cpu-e2": lambda: _cpu(2),
    "cpu-e4": lambda: _cpu(4),
    "cpu-e8": lambda: _cpu(8),
    "cpu-small": lambda: _cpu_small(4),
    "cpu-medium": lambda: _cpu_medium(4),
    "cpu-medium-e8": lambda: _cpu_medium(8),
    "cpu-long": lambda: _cpu_long(4),
    "cpu-long-e2": lambda: _cpu_long(2),
    "cpu-long-e8": lambda: _cpu_long(8),
    "paper-335m-e4": lambda: _paper_335m(4),
    "paper-335m-e8": lambda: _paper_335m(8),
}


def run_preset(preset: str, **overrides) -> RunConfig:
    """The named run preset with top-level `overrides` (e.g. ``num_experts=2``, ``name=...``)."""
    if preset not in RUN_PRESETS:
        raise SmallTalkError(f"unknown run preset {preset!r}; choose one of {', '.join(RUN_PRESETS)} or give a "
                             "YAML file")
    return RunConfig.from_dict({"preset": preset, **{k: v for k, v in overrides.items() if v is not None}})


# A YAML without `preset:` must give these itself.
_UNPRESET_KEYS = ("num_experts", "prefix_len", "data", "routers", "expert_model", "expert_train")


def load_run_config(spec: str | Path, **overrides) -> RunConfig:
    """A preset name or a YAML/JSON file path -> RunConfig."""
    path = Path(spec)
    if str(spec) in RUN_PRESETS and not path.is_file():
        return run_preset(str(spec), **overrides)
    if not path.is_file():
        raise SmallTalkError(f"--config {spec}: neither a run preset ({', '.join(RUN_PRESETS)}) nor a file")
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
