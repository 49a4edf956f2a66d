"""Prompt text from the command line or standard input, refused by name when it is not UTF-8."""

from __future__ import annotations

import sys

from ..errors import SmallTalkError


def read_prompt(value: str, flag: str = "--prompt") -> str:
    """`value`, or standard input for '-'. Python keeps undecodable argv bytes as lone surrogates
    (surrogateescape); the tokenizer cannot encode those, so they are refused here with the position."""
    if value == "-":
        raw = sys.stdin.buffer.read()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SmallTalkError(f"{flag} -: standard input is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                                 f"{e.start}); convert it, e.g. with iconv -t UTF-8") from None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SmallTalkError(f"{flag}: not UTF-8 text (an undecodable byte at character {e.start}); pass UTF-8 text")
    return value
