"""Deterministic, resumable order over a set of sequence indices.

The order is an endless stream: epoch e is a permutation of the index set drawn from
``(seed, generation, e)``, and the stream is the concatenation of epochs. The whole position is
one integer, ``consumed`` (sequences handed out so far), so a checkpoint can restore it exactly
and a batch may straddle two epochs without special cases.

``generation`` counts index-set changes (EM gives a router a new segment every iteration), so a
new set gets a fresh order even if it happens to have the same size.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..errors import SmallTalkError


def indices_digest(indices: np.ndarray) -> str:
    """Short fingerprint of an index set (order matters) stored in checkpoints."""
    return hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


class Sampler:
    def __init__(self, indices: np.ndarray, seed: int):
        self.seed = int(seed)
        self.generation = 0
        self.consumed = 0
        self._set(indices)

    def _set(self, indices: np.ndarray) -> None:
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1 or len(indices) == 0:
            raise SmallTalkError(f"training index set must be a non-empty 1-D array, got shape {indices.shape}")
        self.indices = indices
        self.digest = indices_digest(indices)
        self._epoch_cache: tuple[int, np.ndarray] | None = None

    def set_indices(self, indices: np.ndarray) -> bool:
        """Switch to a new index set and start its order from the beginning; returns False (and keeps the
        position) when `indices` equals the current set, so re-applying the same set after a resume is a no-op."""
        if indices_digest(np.asarray(indices, dtype=np.int64)) == self.digest:
            return False
        self._set(indices)
        self.generation += 1
        self.consumed = 0
        return True

    @property
    def epoch(self) -> int:
        return self.consumed // len(self.indices)

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, self.generation, epoch])
            self._epoch_cache = (epoch, self.indices[rng.permutation(len(self.indices))])
        return self._epoch_cache[1]

    def next(self, n: int) -> np.ndarray:
        """The next `n` global sequence indices of the stream (int64, (n,))."""
        out = np.empty(n, dtype=np.int64)
        filled, size = 0, len(self.indices)
        while filled < n:
            epoch, offset = divmod(self.consumed, size)
            take = min(n - filled, size - offset)
            out[filled:filled + take] = self._permutation(epoch)[offset:offset + take]
            filled += take
            self.consumed += take
        return out

    def state_dict(self) -> dict:
        return {"seed": self.seed, "generation": self.generation, "consumed": self.consumed,
                "num_indices": len(self.indices), "digest": self.digest}

    def load_state_dict(self, state: dict, indices: np.ndarray) -> None:
        """Restore a position saved by state_dict(); `indices` is the set that was saved with it."""
        self._set(indices)
        if self.digest != state["digest"]:
            raise SmallTalkError(f"sampler state is for index set {state['digest']} but the saved indices hash to "
                                 f"{self.digest}; the checkpoint is corrupt, delete it to resume from the previous one")
        self.seed, self.generation, self.consumed = int(state["seed"]), int(state["generation"]), int(state["consumed"])
