"""Local copies of the downstream eval sets, loaded for lm-eval's offline task YAMLs.

The YAMLs in ``evaluation/tasks/`` name these functions as ``custom_dataset``; lm-eval calls them
with the task's ``dataset_kwargs`` plus its metadata (so unknown keyword arguments are ignored) and
uses the returned ``DatasetDict`` instead of downloading from the Hub. The data directory is
resolved when the task loads, not when the YAML was written:

    evals_dir=... in lm-eval's ``--metadata`` JSON  >  $SMALLTALK_EVALS  >  ../shared/evals

Files (see ``<evals_dir>/README.md``): ``blimp/<paradigm>.jsonl.gz``, ``hellaswag/val.jsonl.gz``,
``gsm8k/test.jsonl.gz``. Records are read with our own gzip-JSONL reader and turned into
in-memory datasets, so no Hugging Face cache is written and nothing touches the network.

Split names match lm-eval's standard tasks: BLiMP ``train`` (the Hub copy has one split),
HellaSwag ``validation``, GSM8K ``test``.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

from ..errors import SmallTalkError
from ..paths import default_evals_dir

BLIMP_FIELDS = ("sentence_good", "sentence_bad")
HELLASWAG_FIELDS = ("activity_label", "ctx", "endings", "label")
GSM8K_FIELDS = ("question", "answer")


def resolve_evals_dir(evals_dir: str | Path | None = None) -> Path:
    path = Path(evals_dir) if evals_dir else default_evals_dir()
    if not path.is_dir():
        raise SmallTalkError(f"eval data directory {path} not found; set SMALLTALK_EVALS or pass --evals PATH")
    return path


def read_jsonl_gz(path: Path, required: tuple[str, ...]) -> list[dict]:
    """All records of a gzip JSON Lines file; each must have the `required` fields."""
    if not path.is_file():
        raise SmallTalkError(f"{path}: eval data file not found; set SMALLTALK_EVALS to the directory holding "
                             "blimp/, hellaswag/ and gsm8k/")
    records = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SmallTalkError(f"{path}:{line_no}: not valid JSON ({e.msg}); re-copy the file") from None
                missing = [k for k in required if k not in record]
                if missing:
                    raise SmallTalkError(f"{path}:{line_no}: record lacks field(s) {missing}; expected {list(required)}")
                records.append(record)
    except (OSError, EOFError) as e:
        raise SmallTalkError(f"{path}: cannot read gzip data ({e}); re-copy the file") from None
    if not records:
        raise SmallTalkError(f"{path}: no records; re-copy the file")
    return records


def _dataset_dict(split: str, records: list[dict]):
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(records)})


def load_blimp(paradigm: str, evals_dir: str | Path | None = None, **_: Any):
    """One BLiMP paradigm (1,000 minimal pairs) as split ``train``."""
    path = resolve_evals_dir(evals_dir) / "blimp" / f"{paradigm}.jsonl.gz"
    records = read_jsonl_gz(path, BLIMP_FIELDS)
    # Keep only the fields the task reads: optional fields (e.g. one_prefix_word_good) exist in some
    # paradigms only, and Dataset.from_list would fill them with None anyway.
    return _dataset_dict("train", [{k: r[k] for k in ("sentence_good", "sentence_bad", "pairID") if k in r}
                                   for r in records])


def load_hellaswag(evals_dir: str | Path | None = None, **_: Any):
    """HellaSwag validation (10,042 items) as split ``validation``."""
    records = read_jsonl_gz(resolve_evals_dir(evals_dir) / "hellaswag" / "val.jsonl.gz", HELLASWAG_FIELDS)
    for r in records:
        if not (isinstance(r["endings"], list) and len(r["endings"]) == 4 and r["label"] in (0, 1, 2, 3)):
            raise SmallTalkError(f"hellaswag item {r.get('id')}: needs 4 endings and a label in 0..3, got "
                                 f"{len(r['endings']) if isinstance(r['endings'], list) else r['endings']!r} "
                                 f"endings and label {r['label']!r}")
    # The standard task adds these in process_docs; done once here because lm-eval calls
    # process_docs on every access and an in-memory dataset has no map cache.
    return _dataset_dict("validation", [{**r, **hellaswag_doc(r)} for r in records])


def load_gsm8k(evals_dir: str | Path | None = None, **_: Any):
    """GSM8K test (1,319 problems) as split ``test``."""
    return _dataset_dict("test", read_jsonl_gz(resolve_evals_dir(evals_dir) / "gsm8k" / "test.jsonl.gz",
                                               GSM8K_FIELDS))


# -- HellaSwag preprocessing (lm-eval's tasks/hellaswag/utils.py, on our field layout) -------------------

def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag text cleanup (WikiHow markers, double spaces)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_context(activity_label: str, ctx: str) -> str:
    """The standard query ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``.

    The local copy stores ``ctx = ctx_a + " " + ctx_b`` only, so the start of ctx_b is recovered as the
    text after the last sentence end; when it starts in lower case (ActivityNet items: "... roof. he")
    its first letter is upper-cased. This matches ctx_b.capitalize() except when ctx_b itself holds
    capitals after its first letter (which capitalize() would lower) - a few words in 10k items.
    """
    head, sep, tail = ctx.rpartition(". ")
    if tail[:1].islower():
        tail = tail[0].upper() + tail[1:]
    return hellaswag_preprocess(f"{activity_label}: {head}{sep}{tail}")


def hellaswag_doc(doc: dict) -> dict:
    """The fields lm-eval's hellaswag ``process_docs`` adds: ``query``, ``choices``, ``gold``."""
    return {"query": hellaswag_context(doc["activity_label"], doc["ctx"]),
            "choices": [hellaswag_preprocess(e) for e in doc["endings"]],
            "gold": int(doc["label"])}
