"""Growing a mixture for a domain it never saw (issue: grow and shrink a trained mixture).

1. A run of the preset on every corpus domain but the held-out one (mixture and its dense baseline).
2. `grow_bundle` with the held-out domain's training text: one new router, one new expert (E + 1).
3. The dense baseline continued on the same text with the same extra training FLOPs (the fair comparison).
4. Scored on the held-out domain's test split and on the old domains' test splits (`evaluate_text`,
   sequences packed per domain): the grown mixture should beat the original mixture and both dense models
   on the new domain, and change the old domains' perplexity by at most 1%.

    python benchmarks/grow_experiment.py --preset cpu --hold-out novels_de --hold-out code_python
    python benchmarks/grow_experiment.py --smoke --hold-out novels_de      # minutes: the mechanics only

Every stage resumes (runs, grown bundles and the continued dense model live under --runs-dir). Writes
benchmarks/results/grow_experiment[_smoke].{json,md}.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

from smalltalk.io import atomic_write_json, atomic_write_text, read_json
from smalltalk.mixture.config import RunConfig, run_preset
from smalltalk.mixture.grow import GrowConfig, grow_bundle
from smalltalk.mixture.pipeline import run_pipeline
from smalltalk.mixture.text_eval import evaluate_text
from smalltalk.paths import default_corpus_dir

RESULTS = Path(__file__).resolve().parent / "results"
SMOKE = {"preset": "tiny", "num_experts": 2, "prefix_len": 16, "valid_seqs": 64,
         "data": {"max_bytes_per_file": 30_000, "num_workers": 1},
         "routers": {"iterations": 2, "steps_per_iteration": 4, "batch_size": 8, "heldout_seqs": 16},
         "expert_train": {"max_steps": 6, "batch_size": 4, "warmup_steps": 2, "eval_every": 0, "eval_batches": 0,
                          "checkpoint_every": 0},
         "eval": {"max_seqs": 32, "prefix_lens": [8]}}


def continued_dense(run: Path, data_dir: Path, flops: float, out: Path) -> Path:
    """The run's dense model trained further on `data_dir` with `flops` training FLOPs (its own settings)."""
    from smalltalk.model.flops import training_flops_per_step
    from smalltalk.model.io import WEIGHTS_FILE, load_weights, read_model_config
    from smalltalk.train.config import TrainConfig
    from smalltalk.data.splits import load_split
    from smalltalk.train.trainer import Trainer

    dense_dir = run / "dense" / "model"
    cfg, config_json = read_model_config(dense_dir)
    base = TrainConfig.from_dict(config_json["train"])
    train = load_split(data_dir, "train")
    per_step = training_flops_per_step(cfg, base.batch_size, train.dataset.seq_len - 1)
    steps = max(1, round(flops / per_step))
    tcfg = base.replace(max_steps=steps, warmup_steps=min(base.warmup_steps, steps // 10), eval_every=0,
                        eval_batches=0, checkpoint_every=0, name="dense-continued")
    trainer = Trainer(cfg, tcfg, train, out, progress=False)
    if trainer.step == 0:
        load_weights(dense_dir / WEIGHTS_FILE, trainer.model)
    trainer.train()
    return out / "model"


def one_domain(args, held: str, corpus: Path) -> dict:
    domains = sorted(p.name.split(".")[0] for p in (corpus / "train").glob("*.jsonl.gz"))
    kept = [d for d in domains if d != held]
    name = f"{'smoke' if args.smoke else args.preset}-without-{held}"
    cfg = RunConfig.from_dict({**SMOKE, "name": name, "domains": kept}) if args.smoke else \
        run_preset(args.preset, name=name, domains=kept)
    run = args.runs_dir / name
    run_pipeline(cfg, run, log=lambda m: print(m, file=sys.stderr))
    grown = run / f"grown-{held}"
    new_text = [str(corpus / "train" / f"{held}.jsonl.gz")]
    if not (grown / "bundle.json").is_file():
        small = GrowConfig(router_steps=8, expert_steps=6, expert_batch_size=4, device="cpu") if args.smoke else GrowConfig()
        grow_bundle(run / "bundle", new_text, grown,
                    small.replace(max_bytes_per_file=cfg.data.max_bytes_per_file))
    lineage = read_json(grown / "lineage.json")
    extra = lineage["training_flops"]["grow"]
    dense_plus = continued_dense(run, Path(lineage["data_dir"]), extra, run / f"dense-plus-{held}")
    new_test = [str(corpus / "test" / f"{held}.jsonl.gz")]
    old_test = [str(corpus / "test" / f"{d}.jsonl.gz") for d in kept]
    limit = 256 if args.smoke else args.max_seqs

    def score(model, sources, dense=None):
        return evaluate_text(model, sources, dense=dense, max_seqs=limit, progress=False, device="cpu")

    new = {"original": score(run / "bundle", new_test, run / "dense" / "model"),
           "grown": score(grown, new_test), "dense_plus": score(dense_plus, new_test)}
    old = {"original": score(run / "bundle", old_test, run / "dense" / "model"), "grown": score(grown, old_test)}
    return {"held_out": held, "run": name, "lineage": lineage,
            "new_domain": {"original_mixture": new["original"]["total"]["ppl"],
                           "dense": new["original"]["total"]["dense_ppl"],
                           "grown_mixture": new["grown"]["total"]["ppl"],
                           "dense_plus_same_extra_flops": new["dense_plus"]["total"]["ppl"],
                           "grown_routing": new["grown"]["total"].get("experts"), "num_seqs": new["grown"]["total"]["num_seqs"]},
            "old_domains": {"original_mixture": old["original"]["total"]["ppl"], "dense": old["original"]["total"]["dense_ppl"],
                            "grown_mixture": old["grown"]["total"]["ppl"],
                            "change_pct": 100 * (old["grown"]["total"]["ppl"] / old["original"]["total"]["ppl"] - 1),
                            "grown_routing": old["grown"]["total"].get("experts"), "num_seqs": old["grown"]["total"]["num_seqs"]}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--hold-out", action="append", required=True, help="corpus domain to hold out (repeatable)")
    ap.add_argument("--runs-dir", type=Path, default=Path("runs"))
    ap.add_argument("--max-seqs", type=int, default=2048, help="test sequences scored per side (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="a few optimizer steps: checks the mechanics")
    ap.add_argument("--results", type=Path, default=RESULTS, help="directory for the .json / .md results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    corpus = default_corpus_dir()
    rows = [one_domain(args, held, corpus) for held in args.hold_out]
    report = {"benchmark": "grow_experiment", "preset": "smoke" if args.smoke else args.preset, "rows": rows,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"}
    stem = "grow_experiment_smoke" if args.smoke else "grow_experiment"
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results / f"{stem}.json", report)
    md = [f"# Growing a mixture for a held-out domain (`{report['preset']}`)", "",
          "| held out | new domain: original mixture | dense | dense + same extra FLOPs | grown mixture | "
          "old domains: original -> grown | change | grow FLOPs / retrain E+1 |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n, o = r["new_domain"], r["old_domains"]
        md.append(f"| {r['held_out']} | {n['original_mixture']:.2f} | {n['dense']:.2f} | "
                  f"{n['dense_plus_same_extra_flops']:.2f} | {n['grown_mixture']:.2f} | {o['original_mixture']:.2f} -> "
                  f"{o['grown_mixture']:.2f} | {o['change_pct']:+.2f}% | "
                  f"{100 * r['lineage']['training_flops']['grow_over_retrain']:.1f}% |")
    atomic_write_text(args.results / f"{stem}.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
