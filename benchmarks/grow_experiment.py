"""Growing a mixture for a domain it never saw (issue: grow and shrink a trained mixture).

1. A run of the preset on every corpus domain but the held-out one (mixture and its dense baseline).
2. `grow_bundle` with the held-out domain's training text: one new router, one new expert (E + 1), the
   expert trained from scratch and, separately, branched from the nearest old expert (same steps, so the
   same training FLOPs: which start is better per FLOP).
3. The dense baseline continued on the same text with the same extra training FLOPs (the fair comparison).
4. Scored on the held-out domain's test split and on the old domains' test splits (`evaluate_text`,
   sequences packed per domain): the grown mixture should beat the original mixture and both dense models
   on the new domain, and change the old domains' perplexity by at most 1%. Where each side's sequences are
   routed shows how the independently trained routers' scores compare (calibration).

    python benchmarks/grow_experiment.py --preset cpu --hold-out novels_de --hold-out code_python
    python benchmarks/grow_experiment.py --smoke --hold-out novels_de      # minutes: the mechanics only

Every stage resumes (runs, grown bundles and the continued dense model live under --runs-dir). Writes
benchmarks/results/grow_experiment[_smoke].{json,md}; a held-out domain's row replaces the one already there,
so domains can be run in separate calls.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

from _results import write_results
from smalltalk.io import read_json
from smalltalk.run.config import RunConfig, run_preset
from smalltalk.mixture.grow import GrowConfig, grow_bundle
from smalltalk.run.pipeline import run_pipeline
from smalltalk.mixture.text_eval import evaluate_text
from smalltalk.paths import default_corpus_dir

RESULTS = Path(__file__).resolve().parent / "results"
SMOKE_SEQS = 256
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
    new_text = [str(corpus / "train" / f"{held}.jsonl.gz")]
    small = GrowConfig(router_steps=8, expert_steps=6, expert_batch_size=4, device="cpu") if args.smoke else GrowConfig()
    grown, branched = run / f"grown-{held}", run / f"grown-nearest-{held}"
    for out, start in ((grown, None), (branched, "nearest")):
        if not (out / "bundle.json").is_file():
            grow_bundle(run / "bundle", new_text, out,
                        small.replace(max_bytes_per_file=cfg.data.max_bytes_per_file, branch_from=start))
    lineage = read_json(grown / "lineage.json")
    extra = lineage["training_flops"]["grow"]
    dense_plus = continued_dense(run, Path(lineage["data_dir"]), extra, run / f"dense-plus-{held}")
    new_test = [str(corpus / "test" / f"{held}.jsonl.gz")]
    old_test = [str(corpus / "test" / f"{d}.jsonl.gz") for d in kept]
    limit = SMOKE_SEQS if args.smoke else args.max_seqs

    def score(model, sources, dense=None):
        return evaluate_text(model, sources, dense=dense, max_seqs=limit, progress=False, device="cpu")

    new = {"original": score(run / "bundle", new_test, run / "dense" / "model"), "grown": score(grown, new_test),
           "branched": score(branched, new_test), "dense_plus": score(dense_plus, new_test)}
    old = {"original": score(run / "bundle", old_test, run / "dense" / "model"), "grown": score(grown, old_test),
           "branched": score(branched, old_test), "dense_plus": score(dense_plus, old_test)}
    E = lineage["added_expert"]

    def new_share(result):  # fraction of the scored sequences that the added expert gets
        counts = {int(k): v for k, v in result["total"].get("experts", {}).items()}  # int keys, str after JSON
        return counts.get(E, 0) / result["total"]["num_seqs"]

    def change(key):
        return 100 * (old[key]["total"]["ppl"] / old["original"]["total"]["ppl"] - 1)

    return {"held_out": held, "run": name, "lineage": lineage,
            "branched_lineage": read_json(branched / "lineage.json"),
            "new_domain": {"original_mixture": new["original"]["total"]["ppl"],
                           "dense": new["original"]["total"]["dense_ppl"],
                           "grown_mixture": new["grown"]["total"]["ppl"],
                           "grown_branched": new["branched"]["total"]["ppl"],
                           "dense_plus_same_extra_flops": new["dense_plus"]["total"]["ppl"],
                           "grown_routing": new["grown"]["total"].get("experts"),
                           "new_expert_share": new_share(new["grown"]),
                           "new_expert_share_branched": new_share(new["branched"]),
                           "original_routing": new["original"]["total"].get("experts"),
                           "num_seqs": new["grown"]["total"]["num_seqs"]},
            "old_domains": {"original_mixture": old["original"]["total"]["ppl"],
                            "dense": old["original"]["total"]["dense_ppl"],
                            "grown_mixture": old["grown"]["total"]["ppl"],
                            "grown_branched": old["branched"]["total"]["ppl"],
                            "dense_plus_same_extra_flops": old["dense_plus"]["total"]["ppl"],
                            "change_pct": change("grown"), "change_pct_branched": change("branched"),
                            "grown_routing": old["grown"]["total"].get("experts"),
                            "new_expert_share": new_share(old["grown"]),
                            "new_expert_share_branched": new_share(old["branched"]),
                            "num_seqs": old["grown"]["total"]["num_seqs"]}}


def to_markdown(report: dict) -> str:
    md = [f"# Growing a mixture for a held-out domain (`{report['preset']}`)", "",
          "Test perplexity on the held-out domain (new) and on the other domains (old); the grown mixtures' new "
          "expert is trained from scratch or branched from the nearest old expert with the same steps (same FLOPs).",
          "", "| held out | new: original mixture | dense | dense + same extra FLOPs | grown (scratch) | "
          "grown (branched from) | old: original | dense | dense + same extra FLOPs | grown (scratch) | "
          "grown (branched) | grow FLOPs / retrain E+1 |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        n, o = r["new_domain"], r["old_domains"]
        md.append(f"| {r['held_out']} | {n['original_mixture']:.2f} | {n['dense']:.2f} | "
                  f"{n['dense_plus_same_extra_flops']:.2f} | {n['grown_mixture']:.2f} | {n['grown_branched']:.2f} "
                  f"(expert {r['branched_lineage']['branch_from']}) | {o['original_mixture']:.2f} | {o['dense']:.2f} | "
                  f"{o['dense_plus_same_extra_flops']:.2f} | "
                  f"{o['grown_mixture']:.2f} ({o['change_pct']:+.2f}%) | {o['grown_branched']:.2f} "
                  f"({o['change_pct_branched']:+.2f}%) | {100 * r['lineage']['training_flops']['grow_over_retrain']:.1f}% |")
    md += ["", "Calibration: the share of each side's test sequences that the new router claims (the new domain "
           "should go to it, the old domains should not).", "",
           "| held out | new domain -> new expert (scratch / branched) | old domains -> new expert | sequences new / old |",
           "|---|---|---|---|"]
    for r in report["rows"]:
        n, o = r["new_domain"], r["old_domains"]
        md.append(f"| {r['held_out']} | {100 * n['new_expert_share']:.1f}% / {100 * n['new_expert_share_branched']:.1f}% "
                  f"| {100 * o['new_expert_share']:.2f}% / {100 * o['new_expert_share_branched']:.2f}% | "
                  f"{n['num_seqs']:,} / {o['num_seqs']:,} |")
    limit = f"the first {report['max_seqs']:,}" if report["max_seqs"] else "all the"
    md += ["", f"Sequences: {limit} test sequences of each side, packed per domain file and taken in file-name "
           "order (so the first old domains weigh most). Grown: the base run's router and expert settings, on the "
           "held-out domain's training text read as the base run reads each file. \"dense + same extra FLOPs\": "
           "the base run's dense model trained further on the same text with the grow's training FLOPs. One seed. "
           f"Machine: {report['machine']}."]
    return "\n".join(md) + "\n"


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
    preset = "smoke" if args.smoke else args.preset
    stem = "grow_experiment_smoke" if args.smoke else "grow_experiment"
    path = args.results / f"{stem}.json"
    earlier = read_json(path)["rows"] if path.is_file() and read_json(path).get("preset") == preset else []
    rows = {r["held_out"]: r for r in earlier}
    for held in args.hold_out:
        rows[held] = one_domain(args, held, corpus)
    report = {"benchmark": "grow_experiment", "preset": preset, "rows": list(rows.values()),
              "max_seqs": SMOKE_SEQS if args.smoke else args.max_seqs,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"}
    write_results(args.results, stem, report, to_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
