"""Encoding documents into token ids in worker processes, in bounded batches (the streaming pass of prepare)."""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
import os
import re
import sys
from typing import Any, Iterator

import numpy as np

from .tokenizer import TextTokenizer

_WORKER: dict[str, Any] = {}


def _worker_init(tokenizer_json: str, dtype: str, in_pool: bool = True) -> None:
    from tokenizers import Tokenizer

    if in_pool:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    raw = tokenizer_json.encode("utf-8")
    _WORKER["tokenizer"] = TextTokenizer(Tokenizer.from_str(tokenizer_json), raw)
    _WORKER["dtype"] = np.dtype(dtype)


def _encode_batch(texts: list[str], ends: list[bool]) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens with an EOS after each document's last piece, per-piece lengths incl. EOS, UTF-8 bytes)."""
    tokens, lengths = _WORKER["tokenizer"].encode_documents(texts, dtype=_WORKER["dtype"], ends=ends)
    return tokens, lengths, sum(len(t.encode("utf-8")) for t in texts)


_RUN_START = re.compile(r"\S(?=\s)")  # the last character before a whitespace run


def document_pieces(text: str, max_chars: int) -> Iterator[tuple[str, bool]]:
    """(piece, is_last) of a document, each at most `max_chars` long. A piece ends where a whitespace run
    starts in the last tenth of the window: byte-level BPE never joins a character with the whitespace
    after it, so the pieces' tokens are the whole document's (a window with no whitespace at all is cut
    where it ends, which may split one word's tokens)."""
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        floor = max(start + 1, end - max(1, max_chars // 10))
        last = None
        for last in _RUN_START.finditer(text, floor - 1, end):
            pass
        end = last.end() if last is not None else end
        yield text[start:end], False
        start = end
    yield text[start:], True


class _Done:
    """An already computed result with the `AsyncResult.get` interface (in-process encoding)."""

    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


class _Pending:
    """A batch encoding in a worker process."""

    def __init__(self, future):
        self.future = future

    def get(self):
        return self.future.result()


class DocumentEncoder:
    """Runs `_encode_batch` in a process pool (or in-process when num_workers <= 1), results in order.

    The pool is a `concurrent.futures.ProcessPoolExecutor`: an interrupted run (Ctrl-C, an error) cancels the
    batches not started and waits for the running ones, which `multiprocessing.Pool.terminate` could not always
    do (it hung once, joining its handler threads after forked tokenizer workers had exited)."""

    def __init__(self, tokenizer: TextTokenizer, dtype: np.dtype, num_workers: int):
        self.pool = None
        args = (tokenizer.to_json(), dtype.str)
        if num_workers <= 1:
            _worker_init(*args, in_pool=False)  # the library still encodes a batch on its own threads
            return
        # fork starts workers in milliseconds and needs no `if __name__ == "__main__"` guard in user scripts;
        # elsewhere (macOS, Windows) fork is unsafe or absent.
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        # Set before forking so the children do not warn that the parent used parallelism.
        previous = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            self.pool = ProcessPoolExecutor(num_workers, mp_context=mp.get_context(method), initializer=_worker_init,
                                            initargs=args)
        finally:
            if previous is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous

    def submit(self, texts: list[str], ends: list[bool]):
        if self.pool is None:
            return _Done(_encode_batch(texts, ends))
        return _Pending(self.pool.submit(_encode_batch, texts, ends))

    def close(self, ok: bool) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=not ok)
            self.pool = None


