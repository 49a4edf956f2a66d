"""The ``smalltalk`` command: a thin argparse front end over the library.

Each subcommand lives in its own module ``smalltalk.cli.<name>`` exposing
``add_parser(subparsers)`` (which must call ``parser.set_defaults(func=run)``) and ``run(args)``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import SmallTalkError

# Order here is the order in `smalltalk --help`.
COMMANDS = [
    "prepare",
    "train",
    "evaluate",
    "generate",
    "export",
    "flops",
    "comm",
    "train_routers",
    "shard",
    "train_expert",
    "train_dense",
    "route",
    "eval_mixture",
    "eval_downstream",
    "serve",
    "shrink",
    "grow",
    "run",
    "analyze",
    "plan",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smalltalk",
        description="Train and serve asynchronous mixtures of language models (SmallTalk LM).",
    )
    from ..version import __version__

    parser.add_argument("--version", action="version", version=f"smalltalk {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        result = args.func(args)
    except SmallTalkError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: completed work is saved; re-run the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader stopped early (`smalltalk plan ... | head -1`): nothing is lost; exit as SIGPIPE would, quietly
        # (stdout pointed at devnull so the interpreter's final flush does not raise again).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
