"""The README's commands are the contract with users: run them so they never rot."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
HANG_S = 3600


def _block(marker: str) -> str:
    m = re.search(rf"<!-- {marker} -->\s*```bash\n(.*?)```\s*<!-- /{marker} -->", README, re.S)
    assert m, f"README has no ```bash block between <!-- {marker} --> markers"
    return m.group(1).strip()


def _without_install(cmd: str) -> list[str]:
    """The install step already ran (we are inside the installed package); keep the rest."""
    parts = [p.strip() for p in cmd.split("&&")]
    return [p for p in parts if not p.startswith("pip install")]


def test_readme_has_two_setup_commands_each_installing():
    for marker in ("main-command", "test-command"):
        cmd = _block(marker)
        assert len(cmd.splitlines()) == 1, f"{marker} must be exactly one command line"
        assert cmd.startswith("pip install "), f"{marker} must install first"


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert "test-command" in ci, ".ci/run must take its command from the README"


def test_readme_quickstart_runs(tmp_path, corpus_dir):
    steps = _without_install(_block("main-command"))
    assert steps and steps[0].startswith("smalltalk "), steps
    bin_dir = Path(sys.executable).parent
    exe = shutil.which("smalltalk", path=str(bin_dir)) or shutil.which("smalltalk")
    assert exe, "the smalltalk console script is not installed"
    env = dict(os.environ, SMALLTALK_CORPUS=str(corpus_dir), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for step in steps:
        # The bound only catches a hang: the quickstart takes ~5 min idle, several times that on a busy machine.
        proc = subprocess.run(step, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=HANG_S)
        assert proc.returncode == 0, f"`{step}` failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    # The quickstart is the whole pipeline: a report, and (issue 5) the mixture already below dense.
    out = tmp_path / "runs" / "quickstart"
    assert (out / "report.md").is_file() and list(out.rglob("manifest.json")), f"no report/manifests under {out}"
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    ev = results["eval"]
    assert ev["mixture"]["ppl"] < ev["dense"]["ppl"], f"mixture {ev['mixture']['ppl']} not below dense {ev['dense']['ppl']}"
    print(f"quickstart: mixture {ev['mixture']['ppl']:.2f} vs dense {ev['dense']['ppl']:.2f}, "
          f"{results['wall_s']:.0f} s of stages")
    _quickstart_numbers_match_the_readme(results)
    _serve_the_quickstart(tmp_path, env)
    _evaluate_own_text(tmp_path, env, corpus_dir)
    _python_api(tmp_path, env)


def _python_api(run_root: Path, env: dict) -> None:
    """The README's Python API block, on the finished quickstart (its `smalltalk.run` finds every stage done)."""
    block = re.search(r"## Python API.*?```python\n(.*?)```", README, re.S).group(1)
    proc = subprocess.run([sys.executable, "-c", block], cwd=run_root, env=env, capture_output=True, text=True,
                          timeout=HANG_S)
    assert proc.returncode == 0, f"the README's Python API block failed:\n{proc.stderr[-3000:]}"
    assert "'ppl':" in proc.stdout, proc.stdout[-2000:]


# A fresh quickstart reproduces the README's numbers to within this (thread counts and CPUs change float sums).
README_TOLERANCE = 0.02


def _quickstart_numbers_match_the_readme(results: dict) -> None:
    row = re.search(r"^\| `tiny` quickstart[^|]*\| ([\d.]+) \| ([\d.]+) \|", README, re.M)
    assert row, "README's results table has no `tiny` quickstart row"
    quoted = {"mixture": float(row.group(1)), "dense": float(row.group(2))}
    for side, value in quoted.items():
        measured = results["eval"][side]["ppl"]
        assert abs(measured - value) <= README_TOLERANCE * value, (
            f"README quotes {side} ppl {value}, a fresh quickstart gives {measured:.2f}: regenerate the README numbers")


def _evaluate_own_text(run_root: Path, env: dict, corpus_dir: Path) -> None:
    """The README's "Evaluate on your own text" commands on a folder of .txt files."""
    import gzip

    docs = run_root / "my_docs"
    docs.mkdir()
    for domain in ("wiki_en", "code_python"):
        with gzip.open(corpus_dir / "test" / f"{domain}.jsonl.gz", "rt", encoding="utf-8") as f:
            (docs / f"{domain}.txt").write_text(json.loads(f.readline())["text"][:4000], encoding="utf-8")
    for line in _block("own-text").splitlines():
        cmd = line.split("#")[0].strip()
        proc = subprocess.run(cmd, shell=True, cwd=run_root, env=env, capture_output=True, text=True, timeout=HANG_S)
        assert proc.returncode == 0, f"`{cmd}` failed:\n{proc.stderr[-3000:]}"
        assert "all text:" in proc.stdout and "wiki_en.txt:" in proc.stdout, proc.stdout


def _serve_the_quickstart(run_root: Path, env: dict) -> None:
    """The README's serve command on the quickstart's bundle, queried with the README's curl command."""
    import httpx

    from smalltalk.serving.process import free_port

    (serve,) = _without_install(_block("serve-command"))
    serve = serve.split("#")[0].strip()
    assert serve.startswith("smalltalk serve runs/quickstart/bundle"), serve
    port = free_port()
    # Its own process group, ended whole below: terminating only the shell would leave the server running.
    proc = subprocess.Popen(f"{serve} --port {port} --threads 1", shell=True, cwd=run_root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(HANG_S * 5):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        curl = re.search(r"(curl -s http://127\.0\.0\.1:8000/v1/completions.*?)\n```", README, re.S).group(1)
        out = subprocess.run(curl.replace("\\\n", " ").replace(":8000/", f":{port}/"), shell=True,
                             capture_output=True, text=True, timeout=HANG_S)
        body = json.loads(out.stdout)
        assert body["choices"][0]["text"] and body["smalltalk"]["routes"][0]["expert"] in range(4), body
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
