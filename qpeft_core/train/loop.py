"""One training loop for LoRA (the baseline), QPA and Quantum-PEFT, on Accelerate.

Per optimizer step: grad_accum micro-batches (forward, accelerator.backward), then the model's
`before_optimizer_step()` hook if it has one (QPA turns the accumulated gradient of the generated weights
into dL/dtheta there, once per step), gradient clipping, AdamW, LR schedule. Around it: a JSON-lines metric
log, periodic evaluation, checkpoints that resume bit-for-bit, and two callbacks for the services layer:
`step_callback(event)` streams progress, `should_stop()` (cancel, budget) ends the run cleanly after a
checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from . import checkpoint
from .data import Batches, TokenData
from .metrics import evaluate
from .models import default_device


@dataclass
class TrainConfig:
    output_dir: str | None = None  # checkpoints and metrics.jsonl go here; None: nothing is written
    max_steps: int = 100  # optimizer steps
    batch_size: int = 8  # per process, per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    weight_decay: float = 0.0
    # {regex on a trainable parameter's name: LR multiplier}; the first pattern that matches (re.search) wins,
    # unmatched parameters get 1. E.g. {"gate": 10} for QPA's output gates, {"classifier": 0.5} for a head.
    lr_scale: dict[str, float] = field(default_factory=dict)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: str = "linear"  # after warmup: linear | cosine decay to 0, or constant
    max_grad_norm: float | None = 1.0  # None: no clipping (the norm is still logged)
    eval_every: int = 0  # optimizer steps; 0: evaluate only at the end
    eval_batch_size: int = 8
    eval_max_tokens: int | None = None  # causal LM: evaluate over exactly this many target tokens
    eval_max_batches: int | None = None
    log_every: int = 1  # one JSON line per log_every steps, loss averaged over them
    save_every: int = 0  # optimizer steps; 0: only at the end and when stopped
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the newest checkpoint in output_dir if there is one
    seed: int = 0
    shuffle: bool = True
    device: str | None = None  # "cpu", "cuda", ...; None: cuda if available
    mixed_precision: str = "no"  # no | fp16 | bf16 (Accelerate)
    deterministic: bool = True
    progress: bool = True  # tqdm bar on the main process
    metrics_file: str = "metrics.jsonl"


@dataclass
class TrainResult:
    step: int  # optimizer steps done in total (across resumes)
    reason: str  # "max_steps" or "stopped"
    history: list[dict]  # every metric record, as in metrics.jsonl
    eval: dict | None  # the last evaluation
    checkpoint: str | None  # the last checkpoint written
    metrics_path: str | None
    train_s: float  # wall time of this call
    quantum: dict | None = None  # the model's cumulative quantum usage, if it reports one


def lr_factor(cfg: TrainConfig):
    """The LR multiplier per optimizer step, for LambdaLR (the Ray trainer uses it too). Not transformers'
    get_scheduler: its warmup starts at 0, so the first optimizer step would not move the weights."""

    def factor(step: int) -> float:  # step = optimizer steps already taken
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    if cfg.schedule not in ("linear", "cosine", "constant"):
        raise ValueError(f"TrainConfig.schedule={cfg.schedule!r}; use 'linear', 'cosine' or 'constant'")
    return factor


def lr_scale_patterns(lr_scale: dict) -> list[tuple[re.Pattern, float]]:
    """TrainConfig.lr_scale compiled, in order; ValueError naming a pattern that is not a regex or a
    multiplier that is not > 0 (the JobSpec checks the same at submit)."""
    patterns = []
    for pattern, scale in lr_scale.items():
        try:
            patterns.append((re.compile(pattern), float(scale)))
        except re.error as e:
            raise ValueError(f"{pattern!r} is not a valid regular expression ({e}); escape it or fix it") from None
        if not scale > 0:
            raise ValueError(f"lr_scale[{pattern!r}] = {scale!r}; a multiplier must be > 0")
    return patterns


def param_groups(model, cfg: TrainConfig) -> list[dict]:
    """The model's trainable parameters as AdamW groups, one per distinct cfg.lr_scale multiplier (the
    unscaled group first, so param_groups[0]["lr"] is the logged base rate). LambdaLR scales each group's own
    initial lr, so the schedule keeps the ratios."""
    try:
        patterns = lr_scale_patterns(cfg.lr_scale)
    except ValueError as e:
        raise ValueError(f"TrainConfig.lr_scale: {e}") from None
    groups, used = {1.0: []}, set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        hit = next((i for i, (rx, _) in enumerate(patterns) if rx.search(name)), None)
        used.add(hit)
        groups.setdefault(1.0 if hit is None else patterns[hit][1], []).append(p)
    unused = [pat for i, (pat, _) in enumerate(cfg.lr_scale.items()) if i not in used]
    if unused:
        raise ValueError(
            f"TrainConfig.lr_scale: {unused} match no trainable parameter; check the names "
            "with model.named_parameters()"
        )
    return [{"params": ps, "lr": cfg.lr * scale} for scale, ps in groups.items() if ps]


def quantum_usage(model) -> dict | None:
    """The model's cumulative quantum usage as a JSON-able dict, from `quantum_usage()` or `usage`."""
    fn = getattr(model, "quantum_usage", None)
    usage = fn() if callable(fn) else getattr(model, "usage", None)
    if usage is None:
        return None
    if dataclasses.is_dataclass(usage):
        usage = dataclasses.asdict(usage)
    usage = dict(usage) if isinstance(usage, dict) else dict(vars(usage))
    if isinstance(usage.get("job_ids"), list):  # grows without bound; the count is enough per step
        usage["n_jobs"] = len(usage.pop("job_ids"))
    return usage


def train(
    model,
    tokenizer,
    train_data: TokenData,
    eval_data: TokenData | None = None,
    config: TrainConfig | None = None,
    step_callback=None,
    should_stop=None,
) -> TrainResult:
    """Train the model's trainable parameters in place; see TrainConfig. Returns a TrainResult.

    `tokenizer` is not needed by the loop itself (the data is already tokenised); it is accepted so callers
    pass the pair they loaded, and is saved beside the final adapter for convenience.
    """
    cfg = config or TrainConfig()
    if cfg.max_steps < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise ValueError("TrainConfig.max_steps, batch_size and grad_accum must be >= 1")
    device = cfg.device or default_device()
    prev_deterministic = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs this to be deterministic
        torch.use_deterministic_algorithms(True, warn_only=True)
    accelerator = Accelerator(cpu=device.startswith("cpu"), mixed_precision=cfg.mixed_precision)
    main = accelerator.is_main_process
    set_seed(cfg.seed)  # overwritten below by the checkpoint's RNG states when resuming

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; wrap it first (get_qpeft_model / make_lora_model)")
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    # The scheduler is not passed to prepare(): Accelerate would step it once per process, and here a step
    # means one optimizer step whatever the number of processes.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    hook = getattr(raw, "before_optimizer_step", None)
    batches = Batches(
        len(train_data),
        cfg.batch_size,
        cfg.seed,
        cfg.shuffle,
        True,
        accelerator.process_index,
        accelerator.num_processes,
    )

    out_dir = Path(cfg.output_dir) if cfg.output_dir else None
    metrics_path = out_dir / cfg.metrics_file if out_dir else None
    state = {"history": [], "window": {"loss": 0.0, "steps": 0, "tokens": 0, "time": 0.0}, "elapsed_s": 0.0}
    step, resumed_from, last_ckpt = 0, None, None
    ckpt = checkpoint.latest(out_dir) if out_dir and cfg.resume else None
    if ckpt is not None:
        saved = checkpoint.load(ckpt, raw, optimizer, scheduler)
        step, resumed_from = saved["step"], str(ckpt)
        batches.load_state_dict(saved["data"])
        state = {k: saved[k] for k in state}
    if main and metrics_path:
        # Rewrite the log from the checkpoint: lines written after it by an interrupted run are dropped, so
        # the file always matches the weights.
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in state["history"]))

    def emit(event: dict) -> None:
        if step_callback is not None and main:
            step_callback(event)

    emit({"event": "start", "step": step, "max_steps": cfg.max_steps, "resumed_from": resumed_from})
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (cfg.progress and main), desc="train")
    t_start, reason, last_eval = time.perf_counter(), "max_steps", None
    model.train()
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=accelerator.device)
            tokens = 0
            for micro in range(cfg.grad_accum):
                batch = {k: v.to(accelerator.device) for k, v in train_data.batch(batches.next()).items()}
                tokens += int(batch["attention_mask"].sum())
                # gradients are only all-reduced on the last micro-batch of a step
                sync = micro == cfg.grad_accum - 1
                with accelerator.no_sync(model) if not sync else contextlib.nullcontext():
                    out = model(**batch)
                    loss = (out["loss"] if isinstance(out, dict) else out.loss) / cfg.grad_accum
                    accelerator.backward(loss)
                loss_sum += loss.detach()
            if callable(hook):
                hook()
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_loss = accelerator.reduce(loss_sum, "mean").item()
            w = state["window"]
            w["loss"] += step_loss
            w["steps"] += 1
            w["tokens"] += tokens * accelerator.num_processes
            w["time"] += time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")

            stop = bool(should_stop()) if should_stop is not None else False
            if accelerator.num_processes > 1:  # every rank must leave the loop at the same step
                stop = accelerator.reduce(torch.tensor(float(stop), device=accelerator.device), "sum").item() > 0
            # A stop only adds a checkpoint: logging and evaluation follow the same schedule as an
            # uninterrupted run, so a stopped-and-resumed run writes exactly the same log.
            final = step >= cfg.max_steps
            do_eval = eval_data is not None and (final or (cfg.eval_every and step % cfg.eval_every == 0))
            if do_eval or final or step % cfg.log_every == 0:
                record = {
                    "step": step,
                    "epoch": batches.epoch + batches.index / batches.per_epoch,
                    "loss": w["loss"] / w["steps"],
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "tokens": w["tokens"],
                    "tokens_per_s": w["tokens"] / max(w["time"], 1e-9),
                    "elapsed_s": state["elapsed_s"] + time.perf_counter() - t_start,
                }
                if do_eval:
                    with accelerator.autocast():
                        last_eval = evaluate(
                            raw, eval_data, cfg.eval_batch_size, cfg.eval_max_tokens, cfg.eval_max_batches
                        )
                    record.update({f"eval_{k}": v for k, v in last_eval.items()})
                usage = quantum_usage(raw)
                if usage is not None:
                    record.update(
                        {"shots": usage.get("shots", 0), "circuits": usage.get("circuits", 0), "quantum": usage}
                    )
                state["history"].append(record)
                state["window"] = {"loss": 0.0, "steps": 0, "tokens": 0, "time": 0.0}
                if main and metrics_path:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                emit({"event": "log", **record})

            if out_dir and (final or stop or (cfg.save_every and step % cfg.save_every == 0)):
                accelerator.wait_for_everyone()
                if main:
                    trainer_state = {**state, "elapsed_s": state["elapsed_s"] + time.perf_counter() - t_start}
                    trainer_state["data"] = batches.state_dict()
                    # the adapter's own save (for users) only where a run ends: resuming needs just the rest
                    last_ckpt = str(
                        checkpoint.save(
                            out_dir, step, raw, optimizer, scheduler, trainer_state, cfg.keep_checkpoints, final or stop
                        )
                    )
                    emit({"event": "checkpoint", "step": step, "path": last_ckpt})
            if stop:
                reason = "stopped"
                break
    finally:
        bar.close()
        torch.use_deterministic_algorithms(prev_deterministic)
    if main and out_dir and tokenizer is not None and last_ckpt and checkpoint.is_adapter(raw):
        tokenizer.save_pretrained(Path(last_ckpt) / "adapter")
    emit({"event": "end", "step": step, "reason": reason, "checkpoint": last_ckpt})
    return TrainResult(
        step=step,
        reason=reason,
        history=state["history"],
        eval=last_eval,
        checkpoint=last_ckpt,
        metrics_path=str(metrics_path) if metrics_path else None,
        train_s=time.perf_counter() - t_start,
        quantum=quantum_usage(raw),
    )
