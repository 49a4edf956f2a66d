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
``blimp_offline_<paradigm>`` subtasks, ``hellaswag_offline``, ``gsm8k_offline``) is always on the task
path, next to the user's own: ``--include_path DIR`` (or several, ``DIR1:DIR2``). lm-eval 0.4.13 takes
``--include_path`` as a single directory (its help shows ``:``-separated paths, but its TaskManager
does not split them), so this wrapper gives every TaskManager the list it means. Standard task names
(``blimp``, ``hellaswag``, ``gsm8k``) are untouched and still load from the Hub for online users.
Local data: ``$SMALLTALK_EVALS`` (default ``../shared/evals``) or ``--metadata '{"evals_dir": PATH}'``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def task_paths(include_path) -> list[Path]:
    """The directories an ``include_path`` value names (a list, or one ``os.pathsep``-separated string), plus
    our offline task directory, each once."""
    if include_path is None:
        given = []
    elif isinstance(include_path, (list, tuple)):
        given = list(include_path)
    else:
        given = str(include_path).split(os.pathsep)
    paths = [Path(p) for p in given if str(p)]
    if TASKS_DIR.resolve() not in {p.resolve() for p in paths}:
        paths.append(TASKS_DIR)
    return paths


def _task_manager_with_our_paths() -> None:
    from lm_eval.tasks import manager

    original = manager.TaskManager.__init__
    if getattr(original, "smalltalk_paths", False):
        return

    def __init__(self, verbosity=None, include_path=None, *args, **kwargs):
        original(self, verbosity, task_paths(include_path), *args, **kwargs)

    __init__.smalltalk_paths = True
    manager.TaskManager.__init__ = __init__


def main(argv: list[str] | None = None) -> None:
    from . import lm_eval_model  # noqa: F401  (registers "smalltalk")
    from lm_eval.__main__ import cli_evaluate

    _task_manager_with_our_paths()
    sys.argv = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
    cli_evaluate()


if __name__ == "__main__":
    main()
