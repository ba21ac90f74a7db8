"""The wrapper every adapter method shares: injection, forward, counts, save/load, merge, LoRA export.

The method contract (what a method such as QPA or Quantum-PEFT implements):

- A config: a dataclass subclassing `AdapterConfig` (config.py) with a class-level `method: str` name and
  JSON-plain fields; `to_dict()` / `from_dict()` come from the base class.
- A method: an `nn.Module` subclassing `AdapterMethod`, built once for the whole model as
  `MethodClass(config, targets)`, where `targets: dict[str, TargetInfo]` maps each targeted module's full
  name to `TargetInfo(name, d_in, d_out)`, in module order. The constructor must not touch the base model.
  It owns every trainable number of the adapter (as its parameters; buffers for fixed state).
- `factors() -> dict[name, (A [r, d_in], B [d_out, r])]`: the current update Delta W = B @ A of each target
  with every scaling folded in, differentiable w.r.t. the method's parameters. r may differ per target.
  It must be (near) zero at initialisation so the wrapped model starts where the base model is.
- Optional hooks (defaults do nothing): `before_forward()` runs at the start of every wrapped forward;
  `before_optimizer_step(average=None, step=None)` is called by training loops after the backward passes of a
  step and before `optimizer.step()` (a data-parallel loop passes `average`, its mean over the replicas, for
  gradients the method takes outside backward; `step` is the optimizer steps already taken); `before_save()`
  runs on every process before the main one saves (for state that takes a collective call to bring up to
  date); `export_factors()` (default: `factors()`) may return a different split with the same products for
  LoRA export; `extra_state() -> dict[str, Tensor]` is saved next to the state_dict and handed back to
  `load_extra_state(dict)` on load (after `load_state_dict` and the move to the device).
- `runs_circuits` (class attribute): True for a method that runs quantum circuits while it trains (QPA);
  the JobSpec, the forecast and the trainer read it through `method_runs_circuits(name)` instead of naming
  methods.
- Registration: `register_method(name, ConfigClass, MethodClass)` at import of the method's package.

The wrapper calls `factors()` once per forward (cached while parameters are unchanged under no_grad),
hands each `AdaptedLinear` its pair, and runs the base model. Base parameters are frozen. Because the
factors of a forward are one shared graph, gradient checkpointing must be non-reentrant (transformers'
default: `gradient_checkpointing_enable()`); reentrant checkpointing would backpropagate it twice.
"""

from __future__ import annotations

from itertools import chain

import torch
from torch import nn

from .config import AdapterConfig, lookup_method
from .layers import AdaptedLinear, TargetInfo, find_modules, find_targets, inject, set_module


class AdapterMethod(nn.Module):
    """Base class of every method: see the module docstring for the contract."""

    runs_circuits = False  # True: it has a QNN, whose angles get their gradient in before_optimizer_step

    def __init__(self, config: AdapterConfig, targets: dict[str, TargetInfo]):
        super().__init__()
        self.config, self.targets = config, dict(targets)

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def before_forward(self) -> None:
        pass

    def before_optimizer_step(self, average=None, step: int | None = None) -> None:
        pass

    def before_save(self) -> None:
        pass

    def export_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return self.factors()

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} saves no extra state, but the adapter file has {sorted(state)}")


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def prepare_modules(model: nn.Module, config: AdapterConfig) -> tuple[dict[str, TargetInfo], list[str]]:
    """Resolve targets and modules_to_save against `model` and check them; mutates nothing."""
    if any(isinstance(m, AdaptedLinear) for m in model.modules()):
        raise ValueError("this model already has qpeft adapters; merge_and_unload() it or start from a fresh model")
    targets = find_targets(model, config.target_modules)
    saves = find_modules(model, config.modules_to_save, "modules_to_save", False) if config.modules_to_save else []
    for s in saves:
        inside = [t for t in targets if t == s or t.startswith(s + ".") or s.startswith(t + ".")]
        if inside:
            raise ValueError(f"module {s} is in modules_to_save and overlaps target(s) {inside}; pick one role")
    return targets, saves


class QPEFTModel(nn.Module):
    """A transformers model with one adapter method injected; behaves like the model it wraps."""

    def __init__(self, model: nn.Module, config: AdapterConfig, method: AdapterMethod, saves: list[str]):
        super().__init__()
        self.base_model, self.qpeft_config, self.method = model, config, method
        self.modules_to_save = list(saves)
        for p in model.parameters():
            p.requires_grad_(False)
        for s in saves:
            model.get_submodule(s).requires_grad_(True)
        method.to(_device(model))
        self._adapted = inject(model, method.targets)  # a plain dict: the layers are registered under base_model
        self._frozen = None  # materialised factors after freeze_generated()
        self._cache = None  # (key, factors) for no-grad forwards

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "method", "_adapted"):
                raise
            return getattr(self.base_model, name)

    # --- forward -------------------------------------------------------------------------------------
    def current_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Delta W factors for this forward: frozen, cached (no-grad, parameters unchanged) or fresh."""
        if self._frozen is not None:
            return self._frozen
        if torch.is_grad_enabled():
            self._cache = None
            return self.method.factors()
        # in-place updates (optimizer steps, load_state_dict) bump _version; .to() changes data_ptr
        key = tuple((t.data_ptr(), t._version) for t in chain(self.method.parameters(), self.method.buffers()))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, {k: (a.detach(), b.detach()) for k, (a, b) in self.method.factors().items()})
        return self._cache[1]

    def _prepare(self):
        self.method.before_forward()
        factors = self.current_factors()
        for name, layer in self._adapted.items():
            layer.delta = factors[name]

    def forward(self, *args, **kwargs):
        self._prepare()
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with torch.no_grad():
            self._prepare()
        return self.base_model.generate(*args, **kwargs)

    def before_optimizer_step(self, average=None, step: int | None = None) -> None:
        """Call after the backward passes of a step, before optimizer.step() (per-step quantum gradients).
        A data-parallel loop passes `average` (tensor -> its mean over the replicas); a loop that counts
        passes `step` (optimizer steps already taken)."""
        self.method.before_optimizer_step(average, step)

    def before_save(self) -> None:
        """Call on every process of a data-parallel run before the main process alone saves: whatever the save
        needs that takes a collective call (QPA measures the current angles) happens here, on all of them."""
        self.method.before_save()

    def freeze_generated(self) -> None:
        """Materialise the current factors; from now on no quantum executor is needed (nor trained)."""
        with torch.no_grad():
            self._frozen = {k: (a.detach().clone(), b.detach().clone()) for k, (a, b) in self.method.factors().items()}
        self.method.requires_grad_(False)

    # --- counts --------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        params = list(self.parameters())  # deduplicated: a tied weight counts once
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # --- save / load / merge / export ----------------------------------------------------------------
    def save_pretrained(self, save_directory) -> None:
        from .io import save

        save(self, save_directory)

    @classmethod
    def from_pretrained(cls, model: nn.Module, adapter_directory) -> QPEFTModel:
        from .io import load

        return load(model, adapter_directory)

    def export_lora(self, save_directory) -> None:
        from .io import export_lora

        export_lora(self, save_directory)

    def merge_and_unload(self) -> nn.Module:
        """The base model with each Delta W added to its weight and every AdaptedLinear removed."""
        with torch.no_grad():
            factors = self.current_factors()
            shared = {}  # parameter id -> how many module slots hold it (tied weights)
            for _, p in self.base_model.named_parameters(remove_duplicate=False):
                shared[id(p)] = shared.get(id(p), 0) + 1
            untied = False
            for name, layer in self._adapted.items():
                untied |= shared[id(layer.base_layer.weight)] > 1
                set_module(self.base_model, name, layer.merged(*factors[name]))
        if untied:  # lm_head now differs from the embeddings: stop transformers from re-tying them on reload
            cfg = getattr(self.base_model, "config", None)
            for c in {id(c): c for c in (cfg, getattr(cfg, "get_text_config", lambda: None)()) if c}.values():
                if hasattr(c, "tie_word_embeddings"):
                    c.tie_word_embeddings = False
        self._adapted = {}
        return self.base_model


def get_qpeft_model(model: nn.Module, config: AdapterConfig) -> QPEFTModel:
    """Freeze `model`, inject the adapter `config` describes, and wrap it."""
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig (e.g. QPAConfig), got {type(config).__name__}")
    _, method_cls = lookup_method(config.method)
    targets, saves = prepare_modules(model, config)
    return QPEFTModel(model, config, method_cls(config, targets), saves)
