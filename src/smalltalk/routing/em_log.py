"""What router EM logs per iteration (``em_log.jsonl``): segment sizes, training losses, how far balancing
overrides the argmax, and on a fixed probe set of held-out sequences each router's prefix NLL, the (router x
held-out segment) NLL matrix (is router e lowest on its own segment?) and how many probe sequences changed
expert; with domains, routing-vs-domain tables and their normalised mutual information (analysis only)."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import rule
from .analysis import contingency, nll_by_segment, normalized_mutual_info, specialisation
from .assign import assignment_objective, segment_sizes
from .score import mean_prefix_nll


def iteration_record(it: int, step: int, E: int, M: int, scores: np.ndarray, assignment: np.ndarray,
                      probe_scores: np.ndarray, probe_assign: np.ndarray | None, prev_probe: np.ndarray | None,
                      train_loss: np.ndarray, domain_names: list[str], domains: np.ndarray,
                      probe_domains: np.ndarray | None) -> dict:
    record: dict[str, Any] = {
        "iteration": it, "step": step,
        "segment_sizes": segment_sizes(assignment, E).tolist(),
        "train_loss": [float(x) for x in train_loss],
        # How much balancing overrides each sequence's best router, and the mean score it achieves.
        "argmax_agreement": float(np.mean(assignment == rule.route(scores))),
        "mean_assigned_nll": float(-assignment_objective(scores, assignment) / len(assignment) / (M - 1)),
    }
    if probe_assign is not None:
        nll = mean_prefix_nll(probe_scores, M)  # (num_probe, E)
        matrix = nll_by_segment(nll, probe_assign, E)
        record.update(heldout_nll=[float(x) for x in nll.mean(axis=0)],
                      heldout_segment_sizes=segment_sizes(probe_assign, E).tolist(),
                      heldout_nll_by_segment=[[float(x) for x in row] for row in matrix],
                      heldout_changed_fraction=(float(np.mean(probe_assign != prev_probe))
                                                if prev_probe is not None else None),
                      **specialisation(matrix))
    if domain_names:
        table = contingency(assignment, domains, E, len(domain_names))
        record.update(domain_table=table.tolist(), nmi=normalized_mutual_info(table))
        if probe_domains is not None and probe_assign is not None:
            ptable = contingency(probe_assign, probe_domains, E, len(domain_names))
            record.update(heldout_domain_table=ptable.tolist(), heldout_nmi=normalized_mutual_info(ptable))
    return record


def describe_iteration(record: dict, iterations: int, seconds: float) -> str:
    nll = record.get("heldout_nll")
    return (f"EM iteration {record['iteration']}/{iterations}: segments {record['segment_sizes']}"
            + (f", held-out NLL {[round(x, 3) for x in nll]}, changed {record['heldout_changed_fraction']}, "
               f"specialised {record['specialised']}" if nll else "") + f" ({seconds:.1f}s)")
