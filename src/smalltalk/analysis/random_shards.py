"""Random-shard control: is the gain from specialisation, or from merely having E models?

E experts, each trained exactly like the run's experts (same architecture, steps, batch, seeds) but
on a *random* balanced shard of the training data (`routing.assign.random_balanced_assignment`,
the same initial assignment EM starts from). With no routers, the experts route for themselves at
inference: a test sequence goes to the expert that gives its first M-hat tokens the highest
log-likelihood (the experts act as their own routers). Compared, at each M-hat, with the run's EM
mixture and the dense model; a random choice of expert per sequence (no routing at all) is shown
too. If EM's gain were only "E models", the random-shard mixture would match it.

Output: ``<run>/analysis/random-shards/`` (the derived run with the experts in ``run/``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..routing import rule
from ..routing.assign import random_balanced_assignment
from ..data.splits import load_split
from .baselines import (EM_LABEL, BaselineConfig, add_bootstrap, comparison_prefix_lens, comparison_table,
                        em_rows, log_to, plot_comparison, row, seeded_random_routes, verdict)
from .derived import prepare_derived_run, train_derived_experts
from .output import write_analysis
from .runs import open_run

NAME = "random-shards"
LABEL = "random shards, self-routed"


def random_partitions(num_train: int, num_valid: int, num_experts: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train assignment, valid routes): random balanced, seeded (the valid routes only pick which valid
    sequences each expert is validated on during training)."""
    return (random_balanced_assignment(num_train, num_experts, seed),
            random_balanced_assignment(num_valid, num_experts, seed + 1))


def analyze_random_shards(run_dir: str | Path, cfg: BaselineConfig | None = None,
                          log: Callable[[str], None] | None = None) -> dict:
    cfg = cfg or BaselineConfig()
    say = log_to(log)
    parent = open_run(run_dir)
    seed = parent.config.seed if cfg.seed is None else cfg.seed
    E = parent.num_experts
    train, valid = (len(load_split(parent.data_dir, s).dataset) for s in ("train", "valid"))
    assignment, valid_routes = random_partitions(train, valid, E, seed)
    root = prepare_derived_run(parent, NAME, assignment, valid_routes,
                               {"method": "random", "seed": seed})
    say(f"random shards: {np.bincount(assignment, minlength=E).tolist()} training sequences per expert")
    derived = train_derived_experts(root, log=say) if cfg.train else open_run(root)

    lens = comparison_prefix_lens(parent, cfg)
    base = parent.scores(cfg, log=say)
    mine = derived.scores(cfg, log=say)
    dense = base.dense_ppl()
    rows, em_nll = em_rows(parent, base, lens, cfg)
    routes = {m: rule.route(mine.self_scores(m)) for m in lens}
    rows += [row(LABEL, m, mine.ppl(routes[m]), dense) for m in lens]
    add_bootstrap(rows, LABEL, em_nll, {m: mine.routed_nll(r) for m, r in routes.items()})
    no_routing = mine.ppl(seeded_random_routes(mine.num_seqs, E, seed))
    rows.append(row("random shards, random expert (no routing)", None, no_routing, dense))
    if dense is not None:
        rows.append(row("dense", None, dense, dense))
    M = parent.prefix_len
    result = {"split": cfg.split, "seed": seed, "num_experts": E, "prefix_len": M, "num_seqs": base.num_seqs,
              "train_counts": np.bincount(assignment, minlength=E).tolist(), "derived_run": str(root), "rows": rows}
    summary = ("Experts trained on random equal shards (same budget as the run's experts), each test sequence "
               "routed to the expert with the highest likelihood of its first M-hat tokens. "
               + verdict(rows, LABEL, sorted({32, M} & set(lens))) + ".")
    write_analysis(parent.root, NAME, "Random-shard control", result, comparison_table(rows), summary,
                   plot=lambda path: plot_comparison([r for r in rows if r["method"] in (EM_LABEL, LABEL)], path,
                                                     "EM routing vs random shards",
                                                     {"dense": dense,
                                                      "random shards, random expert": no_routing}))
    return result
