"""The base adapter config, its (de)serialisation, and the method registry.

A method registers `(config class, method class)` under its name; `get_qpeft_model`, save and load
dispatch on `config.method` through `METHODS`, so adding a method never touches the toolkit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

METHODS: dict[str, tuple[type, type]] = {}


def register_method(name: str, config_cls: type, method_cls: type) -> None:
    if getattr(config_cls, "method", None) != name:
        raise ValueError(f"{config_cls.__name__}.method must be {name!r} to register it under that name")
    METHODS[name] = (config_cls, method_cls)


def lookup_method(name: str, where: str = "config") -> tuple[type, type]:
    if name not in METHODS:
        raise ValueError(
            f"unknown adapter method {name!r} in {where}; known methods: {sorted(METHODS)}. "
            "Import the package that registers it, or fix the 'method' field."
        )
    return METHODS[name]


def method_runs_circuits(name: str) -> bool:
    """Whether the registered method `name` runs quantum circuits while it trains (its `runs_circuits`)."""
    return bool(getattr(lookup_method(name)[1], "runs_circuits", False))


def _plain(v):
    # JSON has no tuples; lists read back fine into tuple-typed fields through __post_init__ or as-is
    return list(v) if isinstance(v, tuple) else v


@dataclass
class AdapterConfig:
    """Fields every method shares.

    target_modules: module names, matched like HF PEFT (a module whose full name equals a name or ends with
        ".<name>"), or one regex string that must fully match the full module name.
    modules_to_save: modules (matched the same way) that are trained in full and saved whole, e.g. a
        classifier head on top of an encoder.
    """

    method: ClassVar[str] = ""
    target_modules: list[str] | str = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if not self.target_modules:
            raise ValueError(f"{type(self).__name__}: target_modules is empty; name the Linear layers to adapt")

    def to_dict(self) -> dict:
        d = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"method": self.method, **d}

    @classmethod
    def from_dict(cls, d: dict) -> AdapterConfig:
        d = dict(d)
        method = d.pop("method", cls.method)
        if method != cls.method:
            raise ValueError(f"{cls.__name__} cannot read a config for method {method!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def config_from_dict(d: dict, where: str = "config") -> AdapterConfig:
    """Any registered method's config from its `to_dict()` form."""
    if not isinstance(d, dict) or "method" not in d:
        raise ValueError(f"{where} has no 'method' field: it is not a qpeft adapter config")
    config_cls, _ = lookup_method(d["method"], where)
    return config_cls.from_dict(d)
