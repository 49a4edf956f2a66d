"""Communication estimates of App. A.4, and the measured bytes a routing run writes beside them.

The estimates are pure arithmetic (no torch); `CommCounter` and `write_comm_report` record what a run
measured. Paper notation: E routers/experts, S sequence length, B_r router batch,
T training tokens per router between two score exchanges, N_steps_router router steps, K message
size in bytes, B expert batch, W parameters of a data-parallel model.

- Router phase: each exchange shares one score per sequence for the T * E / S sequences the E
  routers processed since the last one; the paper counts ``2 (send + receive) x bytes_per_score x
  T * E / S`` bytes per router (5.625 MB for T = 45M, E = 32, S = 1024, fp16), and
  ``N_comm = N_steps_router * S * B_r / T`` exchanges (93.2 for 128k steps at B_r = 32; the paper
  quotes "~ 94", i.e. rounded up: `num_communications(...)` returns the exact ratio, `comm_estimate`
  also gives the ceiling).
- Expert phase (Eq. 17): a K-byte message of fp16 scores feeds the experts for
  ``K / (2 * B * E)`` steps ((2^31 - 1) / (2 * 128 * E) ~ 2^23 / E). The paper's text also writes
  K / (4 * B * E) and states the bound as "<= 2^18"; 2^23 / E is >= 2^18 for every E <= 32, so the
  interval is at least 2^18 steps. We implement Eq. 17's K / (2 * B * E).
- Data-parallel comparison: a bandwidth-optimal all-reduce of fp32 gradients moves
  ``2 * W * 4`` bytes per node per step (10.4 GB for W = 1.3e9).

The paper's "2K per node" is the bandwidth-optimal cost of an all-*reduce*. Sharing scores so that
every worker holds all E scores of every sequence is an all-*gather*: a worker that owns E / P of
the routers must receive the other (P - 1) / P of the N * E scores (and a ring sends as much), so
measured bytes per worker approach ``(P - 1) / P * N * E * bytes_per_score`` each way, which exceeds
the paper's per-router figure by about E / 2 when P = E. `comm_estimate` reports both.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SmallTalkError
from ..io import atomic_write_json, read_json

if TYPE_CHECKING:  # the measured side only; the estimates need neither
    from .config import RouterEMConfig
    from .distributed import Workers

# Paper settings (App. A.4, Table 2): the CLI defaults.
PAPER_SETTINGS = {
    "num_experts": 32,
    "seq_len": 1024,
    "tokens_between_comms": 45_000_000,
    "router_steps": 128_000,
    "router_batch_size": 32,
    "bytes_per_score": 2,
    "expert_batch_size": 128,
    "message_bytes": 2**31 - 1,
    "dense_params": 1.3e9,
}


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise SmallTalkError(f"comm: {name}={value!r} must be a positive number")


def num_communications(router_steps: int, seq_len: int, router_batch_size: int, tokens_between_comms: float) -> float:
    """N_comm = N_steps_router * S * B_r / T: score exchanges during router training (an upper bound)."""
    for name, v in (("router_steps", router_steps), ("seq_len", seq_len),
                    ("router_batch_size", router_batch_size), ("tokens_between_comms", tokens_between_comms)):
        _positive(name, v)
    return router_steps * seq_len * router_batch_size / tokens_between_comms


def sequences_per_comm(num_experts: int, seq_len: int, tokens_between_comms: float) -> float:
    """T * E / S: sequences the E routers processed between two exchanges (one score each)."""
    for name, v in (("num_experts", num_experts), ("seq_len", seq_len), ("tokens_between_comms", tokens_between_comms)):
        _positive(name, v)
    return tokens_between_comms * num_experts / seq_len


def tokens_between_comms_for(num_sequences: int, num_experts: int, seq_len: int) -> float:
    """Inverse of `sequences_per_comm`: T for an EM loop that exchanges scores of `num_sequences` per iteration."""
    for name, v in (("num_sequences", num_sequences), ("num_experts", num_experts), ("seq_len", seq_len)):
        _positive(name, v)
    return num_sequences * seq_len / num_experts


def bytes_per_router_per_comm(num_experts: int, seq_len: int, tokens_between_comms: float,
                              bytes_per_score: int = 2) -> float:
    """The paper's data per router per exchange: 2 (send + receive) * bytes_per_score * T * E / S."""
    _positive("bytes_per_score", bytes_per_score)
    return 2 * bytes_per_score * sequences_per_comm(num_experts, seq_len, tokens_between_comms)


def allgather_bytes_per_worker(num_sequences: float, num_experts: int, world_size: int,
                               bytes_per_score: int = 2) -> float:
    """Bytes a worker must receive (and, in a ring, sends) to all-gather E scores of `num_sequences`."""
    for name, v in (("num_sequences", num_sequences), ("num_experts", num_experts),
                    ("world_size", world_size), ("bytes_per_score", bytes_per_score)):
        _positive(name, v)
    return (world_size - 1) / world_size * num_sequences * num_experts * bytes_per_score


def expert_comm_interval(message_bytes: float, expert_batch_size: int, num_experts: int) -> float:
    """Eq. 17: expert steps fed by one K-byte message of fp16 scores, K / (2 * B * E)."""
    for name, v in (("message_bytes", message_bytes), ("expert_batch_size", expert_batch_size),
                    ("num_experts", num_experts)):
        _positive(name, v)
    return message_bytes / (2 * expert_batch_size * num_experts)


def data_parallel_bytes_per_step(num_params: float, bytes_per_param: int = 4) -> float:
    """Bandwidth-optimal all-reduce of the gradients: 2 * W * bytes_per_param per node per step."""
    _positive("num_params", num_params)
    _positive("bytes_per_param", bytes_per_param)
    return 2 * num_params * bytes_per_param


def comm_estimate(
    num_experts: int,
    seq_len: int,
    tokens_between_comms: float,
    bytes_per_score: int = 2,
    *,
    num_comms: int | None = None,
    router_steps: int | None = None,
    router_batch_size: int | None = None,
    world_size: int | None = None,
    expert_batch_size: int | None = None,
    message_bytes: float | None = None,
    dense_params: float | None = None,
) -> dict:
    """App. A.4 for one setting, as a flat JSON-ready dict (keys that cannot be computed are None).

    `num_comms` is the number of exchanges (e.g. EM iterations a run actually did); without it, it is
    N_comm from `router_steps` and `router_batch_size` (rounded up). `world_size` adds the exact
    all-gather volume per worker; `expert_batch_size` + `message_bytes` add Eq. 17; `dense_params`
    adds the data-parallel bytes per step for comparison.
    """
    n_seq = sequences_per_comm(num_experts, seq_len, tokens_between_comms)
    per_comm = bytes_per_router_per_comm(num_experts, seq_len, tokens_between_comms, bytes_per_score)
    n_comm_exact = None
    if num_comms is None and router_steps is not None and router_batch_size is not None:
        n_comm_exact = num_communications(router_steps, seq_len, router_batch_size, tokens_between_comms)
        num_comms = math.ceil(n_comm_exact)
    elif num_comms is not None:
        _positive("num_comms", num_comms)
    allgather = (allgather_bytes_per_worker(n_seq, num_experts, world_size, bytes_per_score)
                 if world_size is not None else None)
    return {
        "num_experts": num_experts,
        "seq_len": seq_len,
        "tokens_between_comms": tokens_between_comms,
        "bytes_per_score": bytes_per_score,
        "world_size": world_size,
        "sequences_per_comm": n_seq,
        "num_comms_exact": n_comm_exact,
        "num_comms": num_comms,
        "paper_bytes_per_router_per_comm": per_comm,
        "paper_bytes_per_router_total": per_comm * num_comms if num_comms is not None else None,
        "allgather_bytes_per_worker_per_comm": allgather,
        "allgather_bytes_per_worker_total": (allgather * num_comms
                                             if allgather is not None and num_comms is not None else None),
        "expert_steps_between_comms": (expert_comm_interval(message_bytes, expert_batch_size, num_experts)
                                       if expert_batch_size is not None and message_bytes is not None else None),
        "data_parallel_bytes_per_step": (data_parallel_bytes_per_step(dense_params)
                                         if dense_params is not None else None),
    }


def read_measured_comm(run_dir: str | Path) -> dict | None:
    """Bytes measured in a run: ``<run_dir>/routers/comm.json``, or None when the run has none.

    Accepts ``bytes_sent`` / ``bytes_received`` as per-rank lists, {rank: bytes} dicts or single
    numbers, or a ``ranks`` / ``per_rank`` list of {rank, bytes_sent, bytes_received}. Returns
    ``{"path", "per_rank": [{"rank", "bytes_sent", "bytes_received"}], "file": <the whole JSON>}``.
    """
    path = Path(run_dir) / "routers" / "comm.json"
    if not path.exists():
        return None
    data = read_json(path)
    if not isinstance(data, dict):
        raise SmallTalkError(f"{path}: expected a JSON object with bytes_sent/bytes_received")

    def per_rank(key: str) -> dict[int, float]:
        value = data.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return {0: value}
        if isinstance(value, list):
            return dict(enumerate(value))
        if isinstance(value, dict):
            return {int(k): v for k, v in value.items()}
        raise SmallTalkError(f"{path}: {key}={value!r} should be bytes per rank (list, {{rank: bytes}} or a number)")

    rows = data.get("ranks", data.get("per_rank"))
    if isinstance(rows, list):
        try:
            table = [{"rank": int(r.get("rank", i)), "bytes_sent": r["bytes_sent"],
                      "bytes_received": r["bytes_received"]} for i, r in enumerate(rows)]
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise SmallTalkError(f"{path}: each entry of 'ranks' needs bytes_sent and bytes_received ({e})")
    else:
        sent, received = per_rank("bytes_sent"), per_rank("bytes_received")
        if set(sent) != set(received):
            raise SmallTalkError(f"{path}: bytes_sent ranks {sorted(sent)} != bytes_received ranks {sorted(received)}")
        table = [{"rank": r, "bytes_sent": sent[r], "bytes_received": received[r]} for r in sorted(sent)]
    for row in table:
        for key in ("bytes_sent", "bytes_received"):
            v = row[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise SmallTalkError(f"{path}: rank {row['rank']} {key}={v!r} must be a non-negative number")
    return {"path": str(path), "per_rank": table, "file": data}


class CommCounter:
    """Cumulative bytes of one worker, persisted across resumes in work/comm_rank_{r}.json."""

    def __init__(self, path: Path, workers: Workers):
        self.path, self.workers = path, workers
        self.base = read_json(path) if path.exists() else {"bytes_sent": 0, "bytes_received": 0,
                                                               "routing_bytes_sent": 0, "routing_bytes_received": 0,
                                                               "exchanges": 0}
        self.base["rank"] = workers.rank

    def add(self, sent: int, received: int, routing_fraction: float) -> dict:
        b = self.base
        b["bytes_sent"] += sent
        b["bytes_received"] += received
        b["routing_bytes_sent"] += int(round(sent * routing_fraction))
        b["routing_bytes_received"] += int(round(received * routing_fraction))
        b["exchanges"] += 1
        atomic_write_json(self.path, b)
        return {"bytes_sent": sent, "bytes_received": received}


def write_comm_report(out: Path, cfg: RouterEMConfig, seq_len: int, world_size: int, num_comms: int) -> dict:
    """``comm.json``: bytes per worker (summed over resumes) beside the App. A.4 estimate for these settings."""
    ranks = []
    for path in sorted((out / "work").glob("comm_rank_*.json")):
        c = read_json(path)
        if int(c.get("rank", -1)) < world_size:
            ranks.append(c)
    bytes_per_score = 2 if cfg.score_dtype == "float16" else 4
    estimate = comm_estimate(cfg.num_experts, seq_len, tokens_between_comms_for(cfg.num_seqs, cfg.num_experts, seq_len),
                             bytes_per_score, num_comms=max(1, num_comms), world_size=world_size)
    report = {
        "world_size": world_size, "score_dtype": cfg.score_dtype, "exchanges": num_comms,
        "sequences_per_exchange": cfg.num_seqs, "heldout_per_exchange": cfg.heldout_seqs,
        "note": ("bytes are payload bytes of the score all-gather counted as a ring moves them ((P-1) blocks each "
                 "way); routing_bytes_* count only the N routed sequences, the rest is the held-out probe and one "
                 "row of training losses used for logging"),
        "ranks": [{"rank": int(c["rank"]), "bytes_sent": int(c["bytes_sent"]),
                   "bytes_received": int(c["bytes_received"]), "routing_bytes_sent": int(c["routing_bytes_sent"]),
                   "routing_bytes_received": int(c["routing_bytes_received"]), "exchanges": int(c["exchanges"])}
                  for c in sorted(ranks, key=lambda c: int(c["rank"]))],
        "estimate": estimate,
    }
    atomic_write_json(out / "comm.json", report)
    return report
