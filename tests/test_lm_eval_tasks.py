"""Offline lm-eval task configs over the local eval data: BLiMP (67), HellaSwag, GSM8K."""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402

from smalltalk.errors import SmallTalkError  # noqa: E402
from smalltalk.evaluation import task_data  # noqa: E402
from smalltalk.evaluation.downstream import task_manager  # noqa: E402
from smalltalk.evaluation.lm_eval_cli import TASKS_DIR  # noqa: E402
from smalltalk.paths import default_evals_dir  # noqa: E402


def test_blimp_group_has_all_67_paradigms_like_lm_evals_own():
    ours = sorted(p.name[len("blimp_offline_"):-len(".yaml")] for p in (TASKS_DIR / "blimp").glob("blimp_offline_*.yaml"))
    files = sorted(p.name[:-len(".jsonl.gz")] for p in (default_evals_dir() / "blimp").glob("*.jsonl.gz"))
    standard = re.findall(r'"blimp_(\w+)"', (Path(lm_eval.__file__).parent / "tasks/blimp/_blimp.yaml").read_text())
    assert len(ours) == 67 and ours == files == sorted(standard)
    group = (TASKS_DIR / "blimp" / "_blimp_offline.yaml").read_text()
    assert sorted(re.findall(r"- blimp_offline_(\w+)", group)) == ours


def test_loaders_read_every_local_item():
    blimp = task_data.load_blimp("adjunct_island")["train"]
    assert len(blimp) == 1000 and blimp[0]["sentence_good"] == "Who should Derek hug after shocking Richard?"
    hs = task_data.load_hellaswag()["validation"]
    assert len(hs) == 10042
    first = hs[0]
    # lm-eval's preprocessing: "<activity>: " + ctx_a + " " + ctx_b.capitalize()
    assert first["query"] == "Roof shingle removal: A man is sitting on a roof. He"
    assert first["choices"][3] == "starts pulling up roofing on a roof." and first["gold"] == first["label"] == 3
    gsm = task_data.load_gsm8k()["test"]
    assert len(gsm) == 1319 and gsm[0]["answer"].endswith("#### 18")


@pytest.mark.parametrize("label, ctx, want", [
    ("Clean and jerk", "A lady walks to a barbell. She bends down and grabs the pole. the lady",
     "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady"),
    ("Baking", "A woman stirs a bowl. She pours it.", "Baking: A woman stirs a bowl. She pours it."),
    ("Tennis", "two men play", "Tennis: Two men play"),
])
def test_hellaswag_context_recovers_ctx_b_capitalisation(label, ctx, want):
    assert task_data.hellaswag_context(label, ctx) == want


def _write_gz(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def test_bad_eval_data_is_reported_by_file_and_field(tmp_path):
    with pytest.raises(SmallTalkError, match="eval data directory .* not found"):
        task_data.load_gsm8k(evals_dir=tmp_path / "missing")
    with pytest.raises(SmallTalkError, match=r"gsm8k/test.jsonl.gz: eval data file not found"):
        task_data.load_gsm8k(evals_dir=tmp_path)
    _write_gz(tmp_path / "gsm8k/test.jsonl.gz", ['{"question": "1+1?", "answer": "#### 2"}', "{not json"])
    with pytest.raises(SmallTalkError, match=r"test.jsonl.gz:2: not valid JSON"):
        task_data.load_gsm8k(evals_dir=tmp_path)
    _write_gz(tmp_path / "blimp/x.jsonl.gz", ['{"sentence_good": "A cat sat."}'])
    with pytest.raises(SmallTalkError, match=r"x.jsonl.gz:1: record lacks field\(s\) \['sentence_bad'\]"):
        task_data.load_blimp("x", evals_dir=tmp_path)
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag/val.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(SmallTalkError, match="cannot read gzip data"):
        task_data.load_hellaswag(evals_dir=tmp_path)


class GoldAnswers(LM):
    """Answers every GSM8K prompt with the reference solution: checks the task's prompt, stop
    sequences, answer extraction and metric, not a model."""

    def __init__(self, answers: dict[str, str]):
        super().__init__()
        self.answers, self.gen_kwargs = answers, []

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        for r in requests:
            context, kwargs = r.args
            self.gen_kwargs.append(kwargs)
            question = context.rsplit("Question: ", 1)[1].rsplit("\nAnswer:", 1)[0]
            out.append(" " + self.answers[question])
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


def test_gsm8k_offline_extracts_the_final_number():
    docs = task_data.load_gsm8k()["test"]
    model = GoldAnswers({d["question"]: d["answer"] for d in docs})
    out = simple_evaluate(model=model, tasks=["gsm8k_offline"], limit=25, task_manager=task_manager())
    res = out["results"]["gsm8k_offline"]
    assert res["exact_match,strict-match"] == 1.0 and res["exact_match,flexible-extract"] == 1.0
    assert out["n-samples"]["gsm8k_offline"]["effective"] == 25
    assert all(k["until"][0] == "Question:" and k["do_sample"] is False for k in model.gen_kwargs)


def test_evals_dir_metadata_overrides_the_default(tmp_path, tiny_mixture):
    from smalltalk.evaluation.lm_eval_model import SmallTalkLM

    records = [json.dumps({"sentence_good": "The cats sleep.", "sentence_bad": "The cats sleeps."}),
               json.dumps({"sentence_good": "A dog barks.", "sentence_bad": "A dog bark."})]
    _write_gz(tmp_path / "blimp/adjunct_island.jsonl.gz", records)
    lm = SmallTalkLM(model=str(tiny_mixture["dense"]), device="cpu")
    out = simple_evaluate(model=lm, tasks=["blimp_offline_adjunct_island"], task_manager=task_manager(tmp_path),
                          log_samples=True)
    assert out["n-samples"]["blimp_offline_adjunct_island"]["effective"] == 2
    # lm-eval puts its target delimiter (" ") before each choice, as for the standard blimp task
    assert [s["arguments"][0][1] for s in out["samples"]["blimp_offline_adjunct_island"]] == \
        [" The cats sleep.", " A dog barks."]
