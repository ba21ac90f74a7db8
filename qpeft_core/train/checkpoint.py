"""Checkpoints that resume bit-for-bit.

A checkpoint directory `checkpoint-<step>` holds everything the next step depends on:
- trainable.safetensors: the trainable parameters only (the frozen base model is never copied);
- state.pt: optimizer and LR-scheduler state, python/numpy/torch(/cuda) RNG states;
- trainer_state.json: step, data position (epoch, index), the metric log so far, anything else the loop adds;
- adapter/: the adapter's own save_pretrained output where the model has one (for users, not for resuming).
It is written to a temporary directory and renamed, so a crash never leaves a half-written checkpoint.
state.pt is a pickle: load only checkpoints you wrote yourself.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "checkpoint-"


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_adapter(model) -> bool:
    # A full transformers model also has save_pretrained, but saving it would copy the frozen base weights.
    from transformers import PreTrainedModel

    return hasattr(model, "save_pretrained") and not isinstance(model, PreTrainedModel)


def save(root, step: int, model, optimizer, scheduler, trainer_state: dict, keep: int = 2, save_adapter=True) -> Path:
    """Write checkpoint-<step> under `root`, keep the newest `keep` checkpoints, return its path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"{PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=root))
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}, tmp / "state.pt"
    )
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}))
    if save_adapter and is_adapter(model):
        model.save_pretrained(tmp / "adapter")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    for old in sorted(root.glob(PREFIX + "*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return out


def latest(root) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    found = sorted(Path(root).glob(PREFIX + "*")) if root and Path(root).is_dir() else []
    return found[-1] if found else None


def load(path, model, optimizer=None, scheduler=None, restore_rng: bool = True) -> dict:
    """Restore a checkpoint into `model` (and optimizer/scheduler/RNG when given); return trainer_state."""
    path = Path(path)
    if not (path / "trainable.safetensors").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint (no trainable.safetensors); pass a {PREFIX}* directory")
    saved = load_file(str(path / "trainable.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if saved.keys() != params.keys():
        missing, extra = sorted(params.keys() - saved.keys()), sorted(saved.keys() - params.keys())
        raise KeyError(
            f"checkpoint {path} does not match the model's trainable parameters: "
            f"missing {missing[:5]}, unexpected {extra[:5]}"
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    state = torch.load(path / "state.pt", weights_only=False)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return json.loads((path / "trainer_state.json").read_text())
