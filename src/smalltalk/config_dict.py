"""Dict round-trip shared by the typed dataclass configs (model, train, router EM, prepare, run).

Configs are saved beside every run (``config.json``, ``run_config.json``) and read back on resume,
so a key the code does not know is refused by name rather than silently dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

from .errors import SmallTalkError

C = TypeVar("C", bound="DictConfig")


def check_known_keys(cls: type, d: dict, where: str) -> None:
    """Raise a one-line error naming the keys of `d` that are not fields of dataclass `cls`."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise SmallTalkError(f"{where}: unknown keys {sorted(unknown)}; known keys are {sorted(known)}")


class DictConfig:
    """Mixin for ``@dataclass`` configs: `to_dict`, `from_dict` (unknown keys refused), `replace`."""

    config_kind: ClassVar[str] = "config"
    """Names the config in error messages, e.g. "model config"."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], d: dict) -> C:
        check_known_keys(cls, d, cls.config_kind)
        return cls(**d)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)
