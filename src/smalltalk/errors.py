"""User-facing errors.

A `SmallTalkError` carries a one-line message that names the file / field / value at fault and
says what to do. The CLI prints it as ``error: <message>`` and exits with status 2; library callers
can catch it. Anything else that escapes is a bug and keeps its traceback.
"""


class SmallTalkError(Exception):
    """A clear, one-line error about bad input or state (not a bug)."""

    exit_code = 2

    def __init__(self, message: str):
        # One line, always: multi-line messages are folded so logs stay greppable.
        super().__init__(" ".join(str(message).split()))
