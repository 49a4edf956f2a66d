"""lm-eval's own command line, with the ``smalltalk`` model registered and the offline tasks on the path.

    python -m smalltalk.evaluation.lm_eval_cli --model smalltalk --model_args bundle=runs/x/bundle \\
        --tasks blimp_offline,hellaswag_offline,gsm8k_offline --device cpu --batch_size 32

Why a wrapper: lm-eval 0.4.13 finds models only in its registry, which it fills from its own
``lm_eval.models`` package; it reads no plugin entry points (``lm_eval/api/registry.py``:
``get_model`` imports ``lm_eval.models`` and nothing else), and task ``--include_path`` Python files
are imported only after the model is built. So the plain ``lm_eval --model smalltalk`` cannot see an
external model; this module imports ours (registering it) and then runs lm-eval's unchanged CLI
(``lm_eval.__main__.cli_evaluate``), so every lm-eval flag works as documented.

The offline task directory (``smalltalk/evaluation/tasks``: ``blimp_offline`` and its 67
``blimp_offline_<paradigm>`` subtasks, ``hellaswag_offline``, ``gsm8k_offline``) is appended to
``--include_path`` for the ``run``, ``ls`` and ``validate`` commands. Standard task names
(``blimp``, ``hellaswag``, ``gsm8k``) are untouched and still load from the Hub for online users.
Local data: ``$SMALLTALK_EVALS`` (default ``../shared/evals``) or ``--metadata '{"evals_dir": PATH}'``.
"""

from __future__ import annotations

import sys
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
_COMMANDS_WITH_INCLUDE = ("run", "ls", "list", "validate")


def with_task_path(argv: list[str]) -> list[str]:
    """`argv` (without the program name) with our task directory added to --include_path."""
    argv = list(argv)
    command = argv[0] if argv and not argv[0].startswith("-") else None
    if command is not None and command not in _COMMANDS_WITH_INCLUDE:
        return argv
    for i, arg in enumerate(argv):
        if arg == "--include_path" and i + 1 < len(argv):
            argv[i + 1] = f"{argv[i + 1]}:{TASKS_DIR}"
            return argv
        if arg.startswith("--include_path="):
            argv[i] = f"{arg}:{TASKS_DIR}"
            return argv
    if command is None and len(argv) < 2:
        return argv  # bare `--help` and the like: lm-eval prints its usage
    return argv + ["--include_path", str(TASKS_DIR)]


def main(argv: list[str] | None = None) -> None:
    from . import lm_eval_model  # noqa: F401  (registers "smalltalk")
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0]] + with_task_path(sys.argv[1:] if argv is None else argv)
    cli_evaluate()


if __name__ == "__main__":
    main()
