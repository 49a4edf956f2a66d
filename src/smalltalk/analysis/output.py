"""Where an analysis writes, and how: ``<run>/analysis/<name>/`` holds

    result.json   every number of the analysis (what benchmarks and the report read)
    table.md      the table(s), Markdown
    <name>.png    the plot
    section.md    a report section: a title, a one-paragraph reading of the result, the table, the plot

All writes are atomic. The run report includes ``analysis/*/section.md`` when present.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ..io import atomic_open, atomic_write_json, atomic_write_text
from ..run.layout import ANALYSIS_DIR



def analysis_dir(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / ANALYSIS_DIR / name


def fmt(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def pct(x: float | None) -> str:
    return "–" if x is None else f"{x:+.2f}%"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    return path


def write_analysis(run_dir: str | Path, name: str, title: str, result: dict, table_md: str, summary: str,
                   plot: Callable[[Path], Path] | None = None) -> dict[str, Path]:
    """Write the files of the module docstring; returns their paths."""
    out = analysis_dir(run_dir, name)
    out.mkdir(parents=True, exist_ok=True)
    result = {"analysis": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **result}
    paths = {"result": out / "result.json", "table": out / "table.md", "section": out / "section.md"}
    atomic_write_json(paths["result"], result)
    atomic_write_text(paths["table"], table_md.rstrip() + "\n")
    section = [f"## {title}", "", summary.strip(), "", table_md.rstrip(), ""]
    if plot is not None:
        paths["plot"] = plot(out / f"{name}.png")
        # Relative to the run directory, where report.md lives.
        section += [f"![{name}]({ANALYSIS_DIR}/{name}/{name}.png)", ""]
    atomic_write_text(paths["section"], "\n".join(section))
    return paths
