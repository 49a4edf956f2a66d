"""docs/python-api.md runs: every ```python block of it, in order, in one namespace, in a fresh directory
(real pipeline, real text, real training steps)."""

from __future__ import annotations

import re
from pathlib import Path

import smalltalk

DOC = Path(__file__).resolve().parent.parent / "docs" / "python-api.md"


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_python_api_doc_runs(tmp_path, monkeypatch, corpus_dir, capsys):
    blocks = code_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SMALLTALK_CORPUS", str(corpus_dir))
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name} block {i + 1}", "exec"), namespace)
    out = capsys.readouterr().out
    assert re.search(r"mixture [\d.]+ vs dense [\d.]+ test ppl", out)
    assert (tmp_path / "runs" / "notebook" / "report.md").is_file()
    assert re.search(r"^train (the dense model|the pure mixture|split training)", out, re.M)
    scores = namespace["scores"]
    assert set(scores["groups"]) == {"notes.md", "code.txt"} and scores["dense"]  # the run's dense model
    assert "runs/no-such-run" in out and "not a mixture bundle" in out  # the error block printed its message


def test_the_public_names_resolve_and_run_stays_the_function():
    import smalltalk.run.pipeline  # noqa: F401  (importing the subpackage must not shadow smalltalk.run)

    assert callable(smalltalk.run) and smalltalk.run.__module__ == "smalltalk"
    for name in smalltalk.__all__:
        assert getattr(smalltalk, name) is not None
    assert smalltalk.RunConfig.__module__ == "smalltalk.run.config"
