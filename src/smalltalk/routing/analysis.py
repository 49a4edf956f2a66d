"""Analysis of routing during EM: routing-vs-domain tables, mutual information, specialisation, plots.

Analysis only: these functions read domain labels, the routing code path (score, assign, em) never does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..io import atomic_open


def contingency(assignment: np.ndarray, domains: np.ndarray, num_experts: int, num_domains: int) -> np.ndarray:
    """(E, D) counts of sequences per (expert, domain); sequences with unknown domain (-1) are left out."""
    assignment, domains = np.asarray(assignment), np.asarray(domains)
    known = domains >= 0
    table = np.zeros((num_experts, num_domains), dtype=np.int64)
    np.add.at(table, (assignment[known], domains[known].astype(np.int64)), 1)
    return table


def normalized_mutual_info(table: np.ndarray) -> float:
    """NMI of a contingency table: I(X; Y) / mean(H(X), H(Y)) in [0, 1] (sklearn's default, "arithmetic").
    0 when either variable is constant."""
    table = np.asarray(table, dtype=np.float64)
    n = table.sum()
    if n == 0:
        return 0.0
    p = table / n
    px, py = p.sum(axis=1), p.sum(axis=0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(px, py)[nz])).sum())
    hx = float(-(px[px > 0] * np.log(px[px > 0])).sum())
    hy = float(-(py[py > 0] * np.log(py[py > 0])).sum())
    if hx == 0 or hy == 0:
        return 0.0
    return max(0.0, min(1.0, mi / ((hx + hy) / 2)))


def nll_by_segment(nll: np.ndarray, assignment: np.ndarray, num_experts: int) -> np.ndarray:
    """nll (n, E) per-token NLL of each sequence under each router; assignment (n,) -> (E routers, E segments)
    mean NLL of router e on the sequences of segment s (NaN for an empty segment)."""
    out = np.full((num_experts, num_experts), np.nan)
    for s in range(num_experts):
        sel = assignment == s
        if sel.any():
            out[:, s] = nll[sel].mean(axis=0)
    return out


def specialisation(matrix: np.ndarray) -> dict:
    """Specialisation checks on the (router e, held-out segment s) mean-NLL matrix.

    * own_router_best_on_segment[s]: on segment s, router s has the lowest NLL of all routers (what
      routing by argmax relies on);
    * router_lowest_on_own_segment[e]: router e's raw NLL is lowest on its own segment. Segments differ
      in intrinsic difficulty (code is easier than novels for every router), so this can fail for
      well-specialised routers; hence also
    * router_relatively_best_on_own_segment[e]: router e's NLL minus the mean over routers on each
      segment (its advantage) is lowest on its own segment.
    `specialised` = the first and the third hold for every router.
    """
    E = matrix.shape[0]

    def argmin_is(values: np.ndarray, k: int) -> bool:
        return bool(not np.all(np.isnan(values)) and np.nanargmin(values) == k)

    relative = matrix - np.nanmean(matrix, axis=0, keepdims=True)  # (E, E) advantage of router e on segment s
    own_best = [argmin_is(matrix[:, s], s) for s in range(E)]
    raw_row = [argmin_is(matrix[e], e) for e in range(E)]
    rel_row = [argmin_is(relative[e], e) for e in range(E)]
    diag = np.diag(matrix)
    off = (np.nansum(matrix, axis=1) - diag) / max(1, E - 1)
    return {"own_router_best_on_segment": own_best, "router_lowest_on_own_segment": raw_row,
            "router_relatively_best_on_own_segment": rel_row, "specialised": all(own_best) and all(rel_row),
            "own_minus_other_segments_nll": [float(x) for x in diag - off]}


def plot_em(records: Sequence[dict], path: str | Path) -> None:
    """PNG with segment sizes and held-out prefix NLL per router over EM iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        return
    its = [r["iteration"] for r in records]
    E = len(records[0]["segment_sizes"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for e in range(E):
        ax1.plot(its, [r["segment_sizes"][e] for r in records], marker="o", label=f"router {e}")
        if records[0].get("heldout_nll") is not None:
            ax2.plot(its, [r["heldout_nll"][e] for r in records], marker="o", label=f"router {e}")
    ax1.set(xlabel="EM iteration", ylabel="sequences assigned", title="segment sizes (balanced assignment)")
    ax2.set(xlabel="EM iteration", ylabel="nats / token", title="held-out prefix NLL")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    (ax2 if records[0].get("heldout_nll") is not None else ax1).legend(fontsize=7, ncol=2)  # no probe: no NLL
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
