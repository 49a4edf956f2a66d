"""The plain, unmodified `lm_eval --model local-completions` CLI against a real `smalltalk serve` process
scores the same items as our in-process lm-eval model (`smalltalk.evaluation.lm_eval_cli --model smalltalk`).

lm-eval finds the server's tokenizer endpoints (/tokenizer_info, /tokenize) by itself, sends
context + continuation as token ids with echo + logprobs, and the server routes each request by its own
prefix. With M-hat = 8 the routing windows agree: BLiMP requests have an empty context (lm-eval sends
EOS + sentence, we route the sentence), HellaSwag contexts are longer than 8 tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serving_helpers import ServerProcess
from smalltalk.evaluation.lm_eval_cli import TASKS_DIR

TASKS = "blimp_offline_wh_island,hellaswag_offline"
LIMIT = "6"
CLI_TIMEOUT_S = 900  # catches a hang only


def _samples(out: Path) -> dict[str, list[dict]]:
    found = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name[len("samples_"):].rsplit("_", 1)[0]
        found[task] = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda d: d["doc_id"])
    return found


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=CLI_TIMEOUT_S, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_plain_lm_eval_cli_through_the_server_equals_in_process_scores(tiny_mixture, tmp_path):
    lm_eval = str(Path(sys.executable).parent / "lm_eval")
    with ServerProcess(tiny_mixture["bundle"], "--served-model-name", "tm", "--prefix-len", "8", log_dir=tmp_path) as s:
        served = _run([lm_eval, "--model", "local-completions", "--model_args",
                       f"base_url={s.v1}/completions,model=tm,max_length=128,num_concurrent=4",
                       "--tasks", TASKS, "--include_path", str(TASKS_DIR), "--limit", LIMIT, "--log_samples",
                       "--output_path", str(tmp_path / "served")], tmp_path)
        metrics = s.metrics()
    assert "blimp_offline_wh_island" in served.stdout
    ours = _run([sys.executable, "-m", "smalltalk.evaluation.lm_eval_cli", "--model", "smalltalk", "--model_args",
                 f"bundle={tiny_mixture['bundle']},prefix_len=8", "--tasks", TASKS, "--limit", LIMIT,
                 "--device", "cpu", "--log_samples", "--output_path", str(tmp_path / "ours")], tmp_path)
    assert ours.returncode == 0
    a, b = _samples(tmp_path / "served"), _samples(tmp_path / "ours")
    assert set(a) == set(b) == {"blimp_offline_wh_island", "hellaswag_offline"}
    for task in a:
        assert [d["doc_id"] for d in a[task]] == [d["doc_id"] for d in b[task]]
        for x, y in zip(a[task], b[task]):
            lx = [float(r[0][0]) for r in x["resps"]]
            ly = [float(r[0][0]) for r in y["resps"]]
            assert lx == pytest.approx(ly, abs=1e-3), (task, x["doc_id"])
            assert x["acc"] == y["acc"]
    # every scored request went through the router (these English tasks all go to the wiki expert)
    routed = sum(v for k, v in metrics.items() if k.startswith("smalltalk_expert_requests_total"))
    assert routed == sum(len(d["resps"]) for docs in a.values() for d in docs)

