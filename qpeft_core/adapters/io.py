"""Adapter files: our own format (save/load) and a standard HF PEFT LoRA export.

Our format, in one directory:
- adapter_config.json: the config's `to_dict()` plus `qpeft_format`, the base model's class, the resolved
  `targets` {full name: [d_in, d_out]} and `saved_modules` (resolved modules_to_save).
- adapter_model.safetensors: `method.<key>` (the method's state_dict: angles, mapping weights, ...),
  `extra.<key>` (the method's extra_state), `modules_to_save.<module>.<key>` (those modules in full).

Loading checks the config, the file and the base model against each other before it changes anything.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import config_from_dict, lookup_method
from .model import QPEFTModel, _device, prepare_modules

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = 1
META_KEYS = ("qpeft_format", "base_model_class", "targets", "saved_modules")


def _cpu(tensors: dict) -> dict:
    # safetensors refuses shared storage (tied weights, views): give every entry its own contiguous copy
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def adapter_state(model: QPEFTModel) -> dict[str, torch.Tensor]:
    sd = {f"method.{k}": v for k, v in model.method.state_dict().items()}
    sd.update({f"extra.{k}": v for k, v in model.method.extra_state().items()})
    for name in model.modules_to_save:
        sd.update(
            {f"modules_to_save.{name}.{k}": v for k, v in model.base_model.get_submodule(name).state_dict().items()}
        )
    return _cpu(sd)


def save(model: QPEFTModel, directory) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    meta = {
        "qpeft_format": FORMAT,
        "base_model_class": type(model.base_model).__name__,
        "targets": {n: [t.d_in, t.d_out] for n, t in model.method.targets.items()},
        "saved_modules": model.modules_to_save,
    }
    save_file(adapter_state(model), str(d / WEIGHTS_NAME), metadata={"format": "pt", "qpeft_format": str(FORMAT)})
    (d / CONFIG_NAME).write_text(json.dumps({**model.qpeft_config.to_dict(), **meta}, indent=2) + "\n")


def _read_config(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a qpeft adapter directory (write one with save_pretrained)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = f"{path} is not valid JSON ({e}): the file is corrupt or truncated; save the adapter again"
        raise ValueError(msg) from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} does not hold a JSON object: not a qpeft adapter config")
    if "peft_type" in raw and "method" not in raw:
        raise ValueError(f"{path} is an HF PEFT adapter, not a qpeft one: load it with peft.PeftModel.from_pretrained")
    meta = {k: raw.pop(k, None) for k in META_KEYS}
    if meta["qpeft_format"] != FORMAT or not isinstance(meta["targets"], dict):
        raise ValueError(f"{path}: missing or unsupported qpeft_format/targets; save the adapter again with this qpeft")
    return config_from_dict(raw, where=str(path)), meta


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the adapter directory is incomplete; save the adapter again")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = f"{path} cannot be read ({e}): the file is corrupt or truncated; save the adapter again"
        raise ValueError(msg) from None


def _check_targets(model, directory, saved: dict, targets: dict) -> None:
    where = f"the adapter in {directory} was saved for a different base model"
    missing = [n for n in saved if n not in targets]
    extra = [n for n in targets if n not in saved]
    if missing or extra:
        raise ValueError(
            f"{where} ({type(model).__name__} here): modules {missing[:5]} are missing here, "
            f"{extra[:5]} are targeted here but not in the adapter; load it onto the model it was trained on"
        )
    for n, t in targets.items():
        if list(saved[n]) != [t.d_in, t.d_out]:
            raise ValueError(
                f"{where}: module {n} is {t.d_in} -> {t.d_out} here but {saved[n][0]} -> {saved[n][1]} in the "
                "adapter; load it onto the model it was trained on"
            )


def load(model: torch.nn.Module, directory) -> QPEFTModel:
    d = Path(directory)
    config, meta = _read_config(d / CONFIG_NAME)
    _, method_cls = lookup_method(config.method, str(d / CONFIG_NAME))
    tensors = _read_weights(d / WEIGHTS_NAME)
    try:
        targets, saves = prepare_modules(model, config)
    except ValueError as e:
        raise ValueError(f"the adapter in {d} does not fit this {type(model).__name__}: {e}") from None
    _check_targets(model, d, meta["targets"], targets)
    if list(meta["saved_modules"] or []) != saves:
        raise ValueError(f"{d}: modules_to_save resolve to {saves} here but {meta['saved_modules']} in the adapter")

    # every key and shape the file must have, from a fresh method and the base model's saved modules
    method = method_cls(config, targets)
    expected = {f"method.{k}": v.shape for k, v in method.state_dict().items()}
    for name in saves:
        expected.update(
            {f"modules_to_save.{name}.{k}": v.shape for k, v in model.get_submodule(name).state_dict().items()}
        )
    got = {k: v for k, v in tensors.items() if not k.startswith("extra.")}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    bad = [
        f"{k}: {tuple(got[k].shape)} in file, {tuple(s)} expected"
        for k, s in expected.items()
        if k in got and got[k].shape != s
    ]
    if missing or unexpected or bad:
        raise ValueError(
            f"{d / WEIGHTS_NAME} does not match its config and this base model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shapes {bad[:5]}; nothing was loaded"
        )

    # the method is not attached to anything yet, so a failure here still leaves the base model untouched
    method.load_state_dict({k[len("method.") :]: v for k, v in got.items() if k.startswith("method.")})
    method.to(_device(model))
    method.load_extra_state({k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")})
    wrapped = QPEFTModel(model, config, method, saves)
    for name in saves:
        prefix = f"modules_to_save.{name}."
        model.get_submodule(name).load_state_dict({k[len(prefix) :]: v for k, v in got.items() if k.startswith(prefix)})
    return wrapped


def export_lora(model: QPEFTModel, directory) -> None:
    """A standard HF PEFT LoRA adapter with the same Delta W: `peft.PeftModel.from_pretrained(base, directory)`.

    lora_alpha = r for every module, so peft's scaling alpha/r is 1 and B @ A is Delta W itself.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        factors = model._frozen if model._frozen is not None else model.method.export_factors()
    tensors, ranks = {}, {}
    for name, (a, b) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
        ranks[name] = a.shape[0]
    for name in model.modules_to_save:
        for k, v in model.base_model.get_submodule(name).state_dict().items():
            tensors[f"base_model.model.{name}.{k}"] = v
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the commonest rank; the rest by pattern
    pattern = {n: k for n, k in ranks.items() if k != r}
    cfg = getattr(model.base_model, "config", None)
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(cfg, "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": list(factors),  # full names: peft matches them exactly
        "modules_to_save": list(model.modules_to_save) or None,
        "fan_in_fan_out": any(layer.conv1d for layer in model._adapted.values()),
        "bias": "none",
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    save_file(_cpu(tensors), str(d / WEIGHTS_NAME), metadata={"format": "pt"})
    (d / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2) + "\n")


@contextlib.contextmanager
def peft_calls():
    """Around peft's constructors only, three of peft 0.21.2's warnings that no argument of ours avoids:
    - PeftModel.__init__ reads `model.is_gradient_checkpointing`, a property transformers 5.x deprecates with a
      FutureWarning on every access (drop this filter once peft reads `is_activation_checkpointing`);
    - LoraConfig has one `fan_in_fan_out` for all targets; peft sets it per module from the module's type and
      warns where they differ, which a target set of GPT-2 Conv1D and nn.Linear layers always does;
    - an adapter on a tied lm_head: ours is an untied update of the head alone (as QPA's merge unties it), and
      peft's `ensure_weight_tying` would put it on the input embeddings as well, so the advice does not apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to", category=UserWarning)
        warnings.filterwarnings("ignore", message="Model has `tie_word_embeddings=True`", category=UserWarning)
        yield


def load_peft_lora(base: torch.nn.Module, directory) -> torch.nn.Module:
    """`peft.PeftModel.from_pretrained(base, directory)`: a LoRA adapter, e.g. one `export_lora` wrote."""
    from peft import PeftModel

    with peft_calls():
        return PeftModel.from_pretrained(base, str(directory))
