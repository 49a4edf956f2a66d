"""Where a benchmark's numbers go: ``<stem>.json`` (everything) and ``<stem>.md`` (the table a reader sees), both
written atomically into the results directory, and the table printed."""

from __future__ import annotations

from pathlib import Path

from smalltalk.io import atomic_write_json, atomic_write_text


def write_results(results: Path, stem: str, report: dict, markdown: str, show: bool = True) -> None:
    """`show=False` for a benchmark that prints its own shorter summary."""
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(results / f"{stem}.json", report)
    atomic_write_text(results / f"{stem}.md", markdown)
    if show:
        print(markdown)


def run_main(main) -> None:
    """A benchmark's entry point: bad input (a SmallTalkError) is one line on stderr and exit status 2."""
    import sys

    from smalltalk.errors import SmallTalkError

    try:
        sys.exit(main())
    except SmallTalkError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
