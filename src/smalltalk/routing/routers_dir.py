"""The routers directory on disk (`smalltalk train-routers`, RUN_DIR/routers): its manifest, reader and loader.

    routers/manifest.json     format "smalltalk-routers", version, num_experts, prefix_len, tokenizer_sha256,
                              router_model (ModelConfig), em (RouterEMConfig), data, routers [{dir, weights_sha256}],
                              final EM diagnostics, comm, elapsed_s, torch_threads
    routers/router_<e>/       one model directory per router (model/io.py)

The manifest is written last: a routers directory without it is not finished.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SmallTalkError
from ..io import atomic_write_json, read_manifest
from ..model.config import ModelConfig
from ..model.io import sha256_file
from .config import RouterEMConfig

FORMAT, VERSION, MANIFEST = "smalltalk-routers", 1, "manifest.json"


def routers_dir(run_dir: str | Path) -> Path:
    """Where a run keeps its routers."""
    return Path(run_dir) / "routers"


def router_dir(directory: str | Path, e: int) -> Path:
    """Router e's model directory inside a routers directory."""
    return Path(directory) / f"router_{e}"


def has_routers(directory: str | Path) -> bool:
    """Whether `directory` holds finished routers (their manifest exists)."""
    return (Path(directory) / MANIFEST).is_file()


@dataclass(frozen=True)
class RoutersManifest:
    """A validated routers manifest; the full dict (EM diagnostics, comm, data) stays in `raw` for reports."""

    dir: Path
    num_experts: int
    prefix_len: int
    tokenizer_sha256: str | None
    router_model: ModelConfig
    em: RouterEMConfig
    """The EM settings the routers were trained with (`em.num_seqs`: sequences scored per iteration)."""
    weights_sha256: list[str | None]
    iterations_completed: int
    raw: dict

    @property
    def path(self) -> Path:
        return self.dir / MANIFEST

    def router_dirs(self) -> list[Path]:
        return [self.dir / r["dir"] for r in self.raw["routers"]]


def read_routers_manifest(directory: str | Path) -> RoutersManifest:
    """Read and check ``<directory>/manifest.json``; errors name the file and say what to do."""
    directory = Path(directory)
    path = directory / MANIFEST
    raw = read_manifest(path, FORMAT, "a routers manifest", "pass the routers/ directory written by `smalltalk train-routers`",
                        missing=f"{directory}: no routers {MANIFEST} there; pass the routers/ directory written by a "
                                "completed `smalltalk train-routers` run (RUN_DIR/routers)")
    if raw.get("version") != VERSION:
        raise SmallTalkError(f"{path}: routers manifest version {raw.get('version')}, this smalltalk reads {VERSION}; "
                             "re-run `smalltalk train-routers`")
    missing = [k for k in ("num_experts", "prefix_len", "routers", "router_model", "em") if k not in raw]
    if missing:
        raise SmallTalkError(f"{path}: routers manifest lacks {missing[0]!r}; re-run `smalltalk train-routers`")
    return RoutersManifest(directory, int(raw["num_experts"]), int(raw["prefix_len"]), raw.get("tokenizer_sha256"),
                           ModelConfig.from_dict(raw["router_model"]), RouterEMConfig.from_dict(raw["em"]),
                           [r.get("weights_sha256") for r in raw["routers"]], int(raw.get("iterations_completed", 0)),
                           raw)


def write_routers_manifest(out: Path, cfg: RouterEMConfig, model_cfg: ModelConfig, data: dict, records: list[dict],
                    comm_report: dict, elapsed: float) -> dict:
    """Write ``<out>/manifest.json`` last, after every router's weights: the directory is complete only then."""
    last = records[-1] if records else {}
    routers = []
    for e in range(cfg.num_experts):
        d = router_dir(out, e)
        routers.append({"dir": d.name, "weights_sha256": sha256_file(d / "model.safetensors")})
    manifest = {
        "format": FORMAT, "version": VERSION,
        "num_experts": cfg.num_experts, "prefix_len": cfg.prefix_len,
        "routers": routers,
        "tokenizer_sha256": data["tokenizer_sha256"],
        "router_model": model_cfg.to_dict(),
        "em": cfg.to_dict(),
        "data": data,
        "iterations_completed": len(records),
        "final": {k: last.get(k) for k in ("segment_sizes", "heldout_nll", "heldout_nll_by_segment",
                                            "own_router_best_on_segment", "router_lowest_on_own_segment",
                                            "router_relatively_best_on_own_segment", "specialised", "nmi",
                                            "heldout_nmi")},
        "comm": {"ranks": comm_report["ranks"], "estimate": comm_report["estimate"]},
        "elapsed_s": elapsed,
        "torch_threads": torch.get_num_threads(),  # bit-exact results need the same thread count
        "files": {"log": "em_log.jsonl", "plot": "em_plot.png", "comm": "comm.json", "config": "em_config.json"},
    }
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def load_routers(directory: str | Path, device: str = "cpu"):
    """(list of E Transformers, manifest) from a ``routers/`` directory written by `train_routers`."""
    from ..model.io import load_model_dir

    directory = Path(directory)
    manifest = read_routers_manifest(directory).raw
    models = []
    for e, entry in enumerate(manifest["routers"]):
        d = directory / entry["dir"]
        if entry.get("weights_sha256") and (d / "model.safetensors").is_file() \
                and sha256_file(d / "model.safetensors") != entry["weights_sha256"]:
            raise SmallTalkError(f"{d / 'model.safetensors'}: router {e} weights do not match the sha256 in "
                                 f"{directory / MANIFEST}; the routers directory was modified: re-run "
                                 "train-routers")
        model, config_json = load_model_dir(d, device=device)
        if config_json.get("tokenizer_sha256") != manifest.get("tokenizer_sha256"):
            raise SmallTalkError(f"{d}: router {e} was trained with tokenizer "
                                 f"{str(config_json.get('tokenizer_sha256'))[:12]}, the manifest says "
                                 f"{str(manifest.get('tokenizer_sha256'))[:12]}; the routers directory is mixed up: "
                                 "re-run train-routers")
        models.append(model)
    return models, manifest
