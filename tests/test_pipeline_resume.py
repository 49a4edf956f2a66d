"""A `smalltalk run` killed mid-way (SIGKILL, as a pre-empted job) resumes where it stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import yaml

from smalltalk.run.layout import RunLayout
from test_pipeline import copy_run, fast_config, sharded_run  # noqa: F401  (module fixture reused)


def test_a_killed_run_resumes(sharded_run, tmp_path):
    run = copy_run(sharded_run, tmp_path / "run")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(fast_config().to_dict()))
    cmd = [sys.executable, "-m", "smalltalk", "run", "--config", str(config), "--out", str(run), "--threads", "1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
                            start_new_session=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "[5/9] experts: running" in line:
            break
    deadline = time.time() + 60
    ckpts = RunLayout(run).expert(0) / "checkpoints"
    while time.time() < deadline and not (ckpts.is_dir() and any(ckpts.glob("step_*"))):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # like a pre-empted job: no clean-up at all
    proc.wait()
    assert proc.returncode != 0 and any("shard: complete, skipped" in x for x in seen)
    assert not (RunLayout(run).expert(1) / "run.json").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "experts: running" in done.stderr and "mixture test ppl" in done.stderr
    metrics = (RunLayout(run).expert(0) / "metrics.jsonl").read_text().splitlines()
    assert [int(yaml.safe_load(x)["step"]) for x in metrics if '"loss"' in x] == list(range(1, 9))
    assert RunLayout(run).report.is_file()
