"""The mixture bundle: everything needed to serve a SmallTalk mixture, in one self-describing directory.

Layout::

    <bundle>/
      bundle.json              what is here (below)
      tokenizer.json           the tokenizer every model was trained with
      routers/router_{e}/      E router model directories (model.safetensors + config.json)
      experts/expert_{e}/      E expert model directories
      manifests/*.json         copies of the manifests of the stages that produced it (data, routers, shards)
      run_config.json          the run configuration (when built by `smalltalk run`)

``bundle.json``::

    {"format": "smalltalk-mixture", "version": 1, "num_experts": E, "prefix_len": M,
     "seq_len": S, "vocab_size": V,
     "tokenizer": {"file": "tokenizer.json", "sha256": "..."},
     "routers": [{"dir": "routers/router_0", "weights_sha256": "..."}, ...],
     "experts": [{"dir": "experts/expert_0", "weights_sha256": "...", "train_seqs": 1234,
                  "train_share": 0.26}, ...],
     "fallback_expert": 2,  "producer": {...}}

Model weights are hard-linked from the run directory when the file system allows (no copy, and a
later re-training writes new files rather than changing linked ones), else copied. The bundle is
assembled in a temporary sibling and renamed into place, so a directory named like the bundle is
complete. Each model's weights sha256 is recorded so a corrupt or swapped file is caught when that
model is loaded, with an error naming it, while the other models stay usable.

Fallback expert: a prompt with no tokens carries no routing evidence; it goes to the expert that
received the largest share of the training data (ties: lowest index), i.e. the maximum of the
empirical prior p(e).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import SmallTalkError
from ..io import atomic_write_json, read_json, replace_dir, temp_dir
from ..data.tokenizer import TOKENIZER_FILE
from ..model.io import CONFIG_FILE, WEIGHTS_FILE, read_model_config, sha256_file

FORMAT = "smalltalk-mixture"
VERSION = 1
BUNDLE_FILE = "bundle.json"


@dataclass
class ModelEntry:
    """One router or expert of a bundle."""

    index: int
    dir: Path
    weights_sha256: str | None
    train_seqs: int | None = None
    train_share: float | None = None


@dataclass
class BundleInfo:
    """The parsed, validated ``bundle.json`` of a bundle directory (no weights loaded)."""

    root: Path
    num_experts: int
    prefix_len: int
    seq_len: int
    vocab_size: int
    tokenizer_file: Path
    tokenizer_sha256: str | None
    routers: list[ModelEntry]
    experts: list[ModelEntry]
    fallback_expert: int
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    def expert_problem(self, e: int, verify: bool = False) -> str | None:
        """Why expert `e` cannot be loaded, judged from the files (None when it looks fine); with `verify` its
        weights are also checked against their sha256 in bundle.json."""
        return _entry_problem(self.experts[e], verify)

    def router_problems(self) -> list[str]:
        return [p for r in self.routers if (p := _model_dir_problem(r.dir))]

    def damaged(self) -> list[str]:
        """Every router and expert whose files are missing or whose weights do not match their sha256 in
        bundle.json (reads every weights file: for growing and shrinking, not for each request)."""
        return [f"{kind} {x.index}: {problem}" for kind, entries in (("router", self.routers), ("expert", self.experts))
                for x in entries if (problem := _entry_problem(x, verify=True))]


def _entry_problem(entry: ModelEntry, verify: bool) -> str | None:
    problem = _model_dir_problem(entry.dir)
    if problem is None and verify and entry.weights_sha256 and \
            sha256_file(entry.dir / WEIGHTS_FILE) != entry.weights_sha256:
        problem = f"{entry.dir / WEIGHTS_FILE}: corrupt (sha256 differs from bundle.json)"
    return problem


def _model_dir_problem(directory: Path) -> str | None:
    if not directory.is_dir():
        return f"{directory}: directory missing"
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            return f"{directory / name}: file missing"
    return None


def is_bundle(path: str | os.PathLike) -> bool:
    return (Path(path) / BUNDLE_FILE).is_file()


def read_bundle(root: str | os.PathLike) -> BundleInfo:
    """Parse ``<root>/bundle.json``; raises SmallTalkError naming the file and field at fault."""
    root = Path(root)
    path = root / BUNDLE_FILE
    if not path.is_file():
        hint = " (a run directory? its bundle is RUN_DIR/bundle)" if (root / "bundle" / BUNDLE_FILE).is_file() else ""
        raise SmallTalkError(f"{root}: not a mixture bundle, no {BUNDLE_FILE}{hint}; build one with `smalltalk run` "
                             "(stage bundle)")
    raw = read_json(path)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise SmallTalkError(f"{path}: format is {raw.get('format') if isinstance(raw, dict) else raw!r}, "
                             f"expected {FORMAT!r}")
    if raw.get("version") != VERSION:
        raise SmallTalkError(f"{path}: bundle version {raw.get('version')}, this smalltalk reads {VERSION}; rebuild it")
    try:
        E = int(raw["num_experts"])
        routers = [ModelEntry(i, root / r["dir"], r.get("weights_sha256")) for i, r in enumerate(raw["routers"])]
        experts = [ModelEntry(i, root / x["dir"], x.get("weights_sha256"), x.get("train_seqs"), x.get("train_share"))
                   for i, x in enumerate(raw["experts"])]
        info = BundleInfo(root=root, num_experts=E, prefix_len=int(raw["prefix_len"]), seq_len=int(raw["seq_len"]),
                          vocab_size=int(raw["vocab_size"]),
                          tokenizer_file=root / raw["tokenizer"]["file"],
                          tokenizer_sha256=raw["tokenizer"].get("sha256"), routers=routers, experts=experts,
                          fallback_expert=int(raw["fallback_expert"]), raw=raw)
    except (KeyError, TypeError, ValueError) as e:
        raise SmallTalkError(f"{path}: missing or malformed field ({type(e).__name__}: {e}); rebuild the bundle")
    if len(routers) != E or len(experts) != E:
        raise SmallTalkError(f"{path}: num_experts={E} but {len(routers)} routers and {len(experts)} experts listed; "
                             "rebuild the bundle")
    if not 0 <= info.fallback_expert < E:
        raise SmallTalkError(f"{path}: fallback_expert={info.fallback_expert} is not an expert index in [0, {E})")
    if not info.tokenizer_file.is_file():
        raise SmallTalkError(f"{info.tokenizer_file}: tokenizer of the bundle is missing; rebuild the bundle")
    return info


def fallback_expert(train_seqs: Sequence[int]) -> int:
    """The expert with the largest training share (lowest index on ties)."""
    return max(range(len(train_seqs)), key=lambda e: (train_seqs[e], -e))


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def _place_model_dir(src: Path, dst: Path, what: str) -> str:
    problem = _model_dir_problem(src)
    if problem:
        raise SmallTalkError(f"{what}: {problem}; train it first")
    dst.mkdir(parents=True)
    for item in src.iterdir():
        if item.is_file() and not item.name.endswith(".tmp"):
            _link_or_copy(item, dst / item.name)
    return sha256_file(dst / WEIGHTS_FILE)


def build_bundle(out: str | os.PathLike, *, router_dirs: Sequence[Path], expert_dirs: Sequence[Path],
                 tokenizer_file: Path, prefix_len: int, train_seqs: Sequence[int],
                 manifests: dict[str, Path] | None = None, run_config: dict | None = None) -> BundleInfo:
    """Assemble a bundle at `out` (replacing any previous one atomically) and return its parsed info.

    `train_seqs[e]` is the number of training sequences of expert e (for shares and the fallback).
    """
    out = Path(out)
    E = len(expert_dirs)
    if E < 1 or len(router_dirs) != E or len(train_seqs) != E:
        raise SmallTalkError(f"build_bundle: {len(router_dirs)} routers, {E} experts and {len(train_seqs)} shard "
                             "sizes must all be equal and >= 1")
    tokenizer_file = Path(tokenizer_file)
    if not tokenizer_file.is_file():
        raise SmallTalkError(f"{tokenizer_file}: tokenizer file not found")
    tok_sha = sha256_file(tokenizer_file)
    expert_cfg, _ = read_model_config(expert_dirs[0])
    for kind, dirs in (("router", router_dirs), ("expert", expert_dirs)):
        for e, d in enumerate(dirs):
            _, cfg_json = read_model_config(d)
            sha = cfg_json.get("tokenizer_sha256")
            if sha and sha != tok_sha:
                raise SmallTalkError(f"{d}: {kind} {e} was trained with tokenizer {sha[:12]}, the bundle's is "
                                     f"{tok_sha[:12]}; all models of a mixture must share one tokenizer")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(f".{out.name}.", out.parent)
    try:
        routers, experts = [], []
        for e in range(E):
            rel = f"routers/router_{e}"
            routers.append({"dir": rel, "weights_sha256": _place_model_dir(Path(router_dirs[e]), tmp / rel,
                                                                           f"router {e}")})
        total = max(1, sum(int(n) for n in train_seqs))
        for e in range(E):
            rel = f"experts/expert_{e}"
            experts.append({"dir": rel, "weights_sha256": _place_model_dir(Path(expert_dirs[e]), tmp / rel,
                                                                           f"expert {e}"),
                            "train_seqs": int(train_seqs[e]), "train_share": int(train_seqs[e]) / total})
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
        for name, path in (manifests or {}).items():
            if Path(path).is_file():
                (tmp / "manifests").mkdir(exist_ok=True)
                shutil.copyfile(path, tmp / "manifests" / f"{name}.json")
        if run_config is not None:
            atomic_write_json(tmp / "run_config.json", run_config)
        from ..version import __version__

        atomic_write_json(tmp / BUNDLE_FILE, {
            "format": FORMAT, "version": VERSION, "num_experts": E, "prefix_len": int(prefix_len),
            "seq_len": expert_cfg.max_seq_len, "vocab_size": expert_cfg.vocab_size,
            "tokenizer": {"file": TOKENIZER_FILE, "sha256": tok_sha},
            "routers": routers, "experts": experts, "fallback_expert": fallback_expert(list(train_seqs)),
            "fallback_rule": "empty prompt -> expert with the largest training share",
            "producer": {"smalltalk": __version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        })
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return read_bundle(out)
