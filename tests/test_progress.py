"""Progress in logs: when stderr is not a terminal (a log file, CI, nohup), long stages print plain lines, never
tqdm's carriage-return redraws."""

from __future__ import annotations

import os
import subprocess
import sys

from smalltalk.progress import Lines, progress


def test_lines_print_at_most_every_interval_and_name_the_rate(capsys):
    bar = progress(desc="scoring", total=40, unit="seqs", every_s=0.0)  # stderr is captured: not a terminal
    assert isinstance(bar, Lines)
    for _ in range(4):
        bar.update(10)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith("scoring: 10/40 seqs (") and lines[3].startswith("scoring: 40/40 seqs (")
    quiet = progress(desc="x", total=2, every_s=0.0, enabled=False)
    quiet.update(2)
    quiet.close()
    assert capsys.readouterr().err == ""


def test_prepare_into_a_log_file_writes_no_carriage_returns(corpus_dir, tmp_path):
    log = tmp_path / "prepare.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "smalltalk", "prepare", "--preset", "tiny", "--corpus",
                               str(corpus_dir), "--out", str(tmp_path / "data"), "--max-bytes-per-file", "60000"],
                              stdout=f, stderr=subprocess.STDOUT, timeout=600, env={**os.environ})
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text and "tokenizing and packing" in text
