"""The downstream comparison as Markdown (the App. B style table and the routing breakdown), and its section
of a run's report.md between ``<!-- downstream -->`` markers (replaced on re-runs)."""

from __future__ import annotations

from pathlib import Path

from ..io import atomic_write_text

SIDES = ("mixture", "dense")
REPORT_BEGIN, REPORT_END = "<!-- downstream -->", "<!-- /downstream -->"


def display_task(task: str) -> str:
    """lm-eval task name -> table label: blimp_offline_<p> -> blimp/<p>, hellaswag_offline -> hellaswag."""
    if task.startswith("blimp_offline_"):
        return "blimp/" + task[len("blimp_offline_"):]
    return task.removesuffix("_offline")


def display_metric(key: str | None) -> str:
    if key is None:
        return "-"
    name, _, filt = key.partition(",")
    return name if filt in ("", "none") else f"{name} ({filt})"


def _fmt(value: float | None, stderr: float | None, bold: bool) -> str:
    if value is None:
        return "-"
    text = f"{value:.4f}"
    text = f"**{text}**" if bold else text
    return f"{text} ± {stderr:.4f}" if stderr is not None else text


def to_markdown(report: dict) -> str:
    cfg, cmp_ = report["config"], report["comparison"]
    num_experts = (cmp_["routing"] or {}).get("num_experts")
    head_mix = f"mixture ({num_experts} experts)" if num_experts else "mixture"
    items = f"limit {cfg['limit']} items per task" if cfg["limit"] else "all items of every task"
    empty = "the scored sentence" if cfg.get("empty_context", "sequence") == "sequence" else "the fallback expert"
    lines = ["## Downstream evaluation: mixture vs dense", "",
             f"lm-eval {report['lm_eval_version']}, zero-shot unless stated, {items}, routing prefix "
             f"{report.get('prefix_len')} tokens, empty contexts (BLiMP) routed by {empty}. "
             "Value ± stderr; the better one in bold, ties both bold.", ""]
    s = cmp_["summary"]
    if s["tasks"]:
        lines += [f"**Mixture better or equal on {s['mixture_better'] + s['ties']} of {s['tasks']} tasks "
                  f"({100 * s['better_or_equal_rate']:.0f}%)**: {s['mixture_better']} better, {s['ties']} ties, "
                  f"{s['dense_better']} worse (paper: 75%).", ""]
    if cmp_["blimp"]:
        b = cmp_["blimp"]
        means = ", ".join(f"{side} {b[f'{side}_mean']:.4f}" for side in SIDES if b.get(f"{side}_mean") is not None)
        lines += [f"BLiMP ({b['paradigms']} paradigm{'s' if b['paradigms'] > 1 else ''}): mean accuracy {means}; mixture better or equal on "
                  f"{b['mixture_better'] + b['ties']} of {b['tasks']} paradigms.", ""]
    lines += [f"| task | metric | {head_mix} | dense | winner | n |", "|---|---|---:|---:|---|---:|"]
    for r in cmp_["rows"]:
        w = r["winner"]
        mix = _fmt(r.get("mixture"), r.get("mixture_stderr"), w in ("mixture", "tie"))
        den = _fmt(r.get("dense"), r.get("dense_stderr"), w in ("dense", "tie"))
        lines.append(f"| {display_task(r['task'])} | {display_metric(r['metric'])} | {mix} | {den} | {w or '-'} | "
                     f"{r['n'] if r['n'] is not None else '-'} |")
    routing = cmp_["routing"]
    if routing:
        E = routing["num_experts"]
        lines += ["", "### Routing: requests per expert", "",
                  "| task | " + " | ".join(f"expert {e}" for e in range(E)) + " |",
                  "|---|" + "---:|" * E]
        for task, counts in routing["requests"].items():
            task = display_task(task)
            total = sum(counts.values()) or 1
            cells = [f"{counts.get(str(e), 0)} ({100 * counts.get(str(e), 0) / total:.0f}%)" for e in range(E)]
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def update_report(report: Path, markdown: str) -> None:
    """Put `markdown` into the run report between the downstream markers (appended the first time)."""
    section = f"{REPORT_BEGIN}\n{markdown.rstrip()}\n{REPORT_END}\n"
    text = report.read_text(encoding="utf-8") if report.is_file() else ""
    if REPORT_BEGIN in text and REPORT_END in text:
        head, _, rest = text.partition(REPORT_BEGIN)
        text = head + section + rest.partition(REPORT_END)[2].lstrip("\n")
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + section
    atomic_write_text(report, text)
