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


_SIMPLE_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def check_field_types(obj: Any, where: str) -> None:
    """Refuse a field whose value is not of its annotated simple type (int, float, bool, str, or one of them
    or None), naming the field: YAML gives `lr: fast` as a string, which would otherwise fail much later
    with an error that names nothing."""
    for f in dataclasses.fields(obj):
        spec = str(f.type).replace(" ", "")
        options = spec.split("|")
        optional = "None" in options
        names = [o for o in options if o != "None"]
        if not names or any(n not in _SIMPLE_TYPES for n in names):
            continue
        value = getattr(obj, f.name)
        if value is None and optional:
            continue
        allowed = tuple(t for n in names for t in _SIMPLE_TYPES[n])
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            kind = " or ".join(names) + (" or null" if optional else "")
            raise SmallTalkError(f"{where}: {f.name}={value!r} must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}")


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
