"""Packing: a stream of EOS-terminated documents -> fixed-length sequences with a domain label each.

Documents are concatenated (each already followed by EOS) and the stream is cut every `seq_len`
tokens; the tail shorter than `seq_len` is carried into the next call and dropped at the end of
the split. Each sequence is labelled with the domain of the document that contributes most of its
tokens (the earliest such document on a tie), computed with array operations only.
"""

from __future__ import annotations

import numpy as np


class SequencePacker:
    def __init__(self, seq_len: int, dtype=np.uint16):
        self.seq_len = seq_len
        self.dtype = np.dtype(dtype)
        self._tokens = np.zeros(0, self.dtype)   # (carry,) tokens not yet in a full sequence
        self._doc = np.zeros(0, np.int64)         # (carry,) global document index of each carried token
        self._domain = np.zeros(0, np.int16)      # (carry,) domain id of each carried token
        self._next_doc = 0
        self.tokens_in = 0   # all tokens added (documents + EOS)
        self.tokens_out = 0  # tokens emitted in complete sequences

    def add(self, tokens: np.ndarray, lengths: np.ndarray, domains: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add documents: `tokens` (sum(lengths),) EOS included, `lengths` (D,), `domains` (D,) int16.

        Returns the sequences completed so far, (n, seq_len), and their domain ids (n,).
        """
        lengths = np.asarray(lengths, dtype=np.int64)
        doc_ids = np.arange(self._next_doc, self._next_doc + len(lengths), dtype=np.int64)
        self._next_doc += len(lengths)
        self.tokens_in += int(lengths.sum())
        stream = np.concatenate([self._tokens, np.asarray(tokens, dtype=self.dtype)])
        doc = np.concatenate([self._doc, np.repeat(doc_ids, lengths)])
        domain = np.concatenate([self._domain, np.repeat(np.asarray(domains, dtype=np.int16), lengths)])
        n = len(stream) // self.seq_len
        keep = n * self.seq_len
        self._tokens, self._doc, self._domain = stream[keep:], doc[keep:], domain[keep:]
        self.tokens_out += keep
        seqs = stream[:keep].reshape(n, self.seq_len)  # (n, S)
        return seqs, self._majority_domain(doc[:keep], domain[:keep], n)

    def _majority_domain(self, doc: np.ndarray, domain: np.ndarray, n: int) -> np.ndarray:
        """Per sequence, the domain of its document with the most tokens. doc/domain: (n * S,)."""
        if n == 0:
            return np.zeros(0, np.int16)
        S = self.seq_len
        positions = np.arange(1, len(doc))
        # A segment = a run of one document inside one sequence.
        starts = np.flatnonzero(np.concatenate([[True], (doc[1:] != doc[:-1]) | (positions % S == 0)]))
        seg_len = np.diff(np.append(starts, len(doc)))
        seg_row = starts // S
        # Sort by row, then longest first; lexsort is stable, so ties keep the earliest document.
        order = np.lexsort((-seg_len, seg_row))
        first = order[np.concatenate([[True], seg_row[order][1:] != seg_row[order][:-1]])]  # (n,)
        return domain[starts[first]].astype(np.int16)

