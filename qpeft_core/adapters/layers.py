"""Finding target modules and swapping them for `AdaptedLinear`.

Supported layers: `nn.Linear` (weight [d_out, d_in]) and transformers' GPT-2 style `Conv1D` (weight
[d_in, d_out], y = x @ W + b). The adapted layer adds x @ A^T @ B^T with factors the wrapper hands it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TargetInfo:
    name: str  # full module name inside the base model
    d_in: int
    d_out: int


def _conv1d_cls():
    from transformers.pytorch_utils import Conv1D  # lazy: importing qpeft_core should not pull transformers

    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, _conv1d_cls())


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a Linear or Conv1D."""
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def name_matches(name: str, pattern: str | list[str]) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def _linear_names(model: nn.Module, limit: int = 12) -> str:
    names = [n for n, m in model.named_modules() if is_supported(m)]
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "(none)"


def find_modules(model: nn.Module, patterns: list[str] | str, what: str, supported_only: bool = True) -> list[str]:
    """Full names of the modules matching `patterns`; every list entry must match something."""
    named = [(n, m) for n, m in model.named_modules() if n]
    entries = [patterns] if isinstance(patterns, str) else list(patterns)
    for p in entries:
        if not any(name_matches(n, p if isinstance(patterns, str) else [p]) for n, _ in named):
            raise ValueError(
                f"{what} {p!r} matches no module of {type(model).__name__}; "
                f"available Linear/Conv1D modules: {_linear_names(model)}. Fix {what} in the config."
            )
    hits = [n for n, _ in named if name_matches(n, patterns)]
    if supported_only:
        modules = dict(named)
        bad = [f"{n} ({type(modules[n]).__name__})" for n in hits if not is_supported(modules[n])]
        if bad:
            raise ValueError(
                f"{what} {patterns!r} matched modules that are not nn.Linear or Conv1D: {', '.join(bad[:5])}; "
                f"name Linear layers instead, e.g. {_linear_names(model, 6)}"
            )
    return hits


def find_targets(model: nn.Module, patterns: list[str] | str) -> dict[str, TargetInfo]:
    """TargetInfo of every targeted layer, in module order; touches nothing."""
    modules = dict(model.named_modules())
    out = {}
    for name in find_modules(model, patterns, "target_modules"):
        d_in, d_out = dims(modules[name])
        out[name] = TargetInfo(name, d_in, d_out)
    return out


class AdaptedLinear(nn.Module):
    """base(x) + (x @ A^T) @ B^T, with (A [r, d_in], B [d_out, r]) set in `delta` by the wrapper."""

    def __init__(self, base_layer: nn.Module, name: str):
        super().__init__()
        self.base_layer, self.name = base_layer, name
        self.conv1d = is_conv1d(base_layer)
        self.d_in, self.d_out = dims(base_layer)
        self.delta: tuple[torch.Tensor, torch.Tensor] | None = None

    # HF code (weight tying, dtype checks) reads .weight/.bias off layers it thinks are Linear
    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def forward(self, x):
        out = self.base_layer(x)
        if self.delta is None:
            raise RuntimeError(
                f"adapted layer {self.name} got no factors: call the QPEFTModel, not the base model inside it"
            )
        A, B = self.delta
        return out + ((x.to(A.dtype) @ A.T) @ B.T).to(out.dtype)

    def merged(self, A: torch.Tensor, B: torch.Tensor) -> nn.Module:
        """The base layer with B @ A added to its weight, as a fresh Parameter so that a weight tied to
        another module (lm_head and the embeddings) is untied rather than changed in both places."""
        base = self.base_layer
        dw = (B @ A).to(base.weight.dtype)
        w = base.weight.detach() + (dw.T if self.conv1d else dw)
        base.weight = nn.Parameter(w.contiguous(), requires_grad=False)
        return base

    def __getstate__(self):
        # the factors of the last forward may carry an autograd graph, which deepcopy/pickle cannot copy
        return {**self.__dict__, "delta": None}

    def extra_repr(self):
        return f"{self.name}: d_in={self.d_in}, d_out={self.d_out}, conv1d={self.conv1d}"


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject(model: nn.Module, targets: dict[str, TargetInfo]) -> dict[str, AdaptedLinear]:
    layers = {}
    for name in targets:
        layers[name] = AdaptedLinear(model.get_submodule(name), name)
        set_module(model, name, layers[name])
    return layers
