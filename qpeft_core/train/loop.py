"""The training loop, the only one in the repository: LoRA (the baseline), QPA and Quantum-PEFT, on
Accelerate, in one process or data-parallel (`accelerate launch`, or a Ray Train worker group).

Per optimizer step: grad_accum micro-batches (forward, accelerator.backward), then the model's
`before_optimizer_step()` hook if it has one (QPA turns the accumulated gradient of the generated weights
into dL/dtheta there, once per step, after the replicas' mean), gradient clipping, AdamW, LR schedule.
Around it: a JSON-lines metric log, periodic evaluation, checkpoints that resume bit-for-bit.

A host drives it through `Hooks` (the Ray trainer in services/trainer uses every one): `event` streams
progress, `should_stop` votes to end the run cleanly after a checkpoint (cancel, budget), `checkpoints`
says where checkpoints are written and restored from, `install_executor` points the model's quantum
circuits at the host's executor once the accelerator exists, `after_step` runs on every process after each
step. An executor that refuses a call (`ExecutionRefused`: out of budget) ends the run at once, keeping the
last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm

from ..quantum.backend import ExecutionRefused
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
    eval_at_start: bool = False  # also evaluate before the first step (logged as step 0)
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
    reason: str  # "max_steps"; "stopped" (should_stop, after a checkpoint); "refused" (an executor, mid-step)
    history: list[dict]  # every metric record, as in metrics.jsonl
    eval: dict | None  # the last evaluation
    checkpoint: str | None  # the last checkpoint written
    metrics_path: str | None
    train_s: float  # wall time of this call
    quantum: dict | None = None  # the model's cumulative quantum usage, if it reports one
    detail: str | None = None  # why it stopped: should_stop's text, or the executor's refusal
    checkpoint_step: int | None = None  # the step of `checkpoint` (also one restored and not re-written)


class LocalCheckpoints:
    """Checkpoints as checkpoint-<step> folders under one directory (TrainConfig.output_dir)."""

    def __init__(self, root, keep: int, resume: bool = True):
        self.root, self.keep, self.resume = Path(root), keep, resume

    @contextlib.contextmanager
    def restore(self):
        yield checkpoint.latest(self.root) if self.resume else None

    def save(self, step: int, write, final: bool, record: dict, accelerator) -> str | None:
        accelerator.wait_for_everyone()
        return str(write(self.root, self.keep, final)) if accelerator.is_main_process else None


@dataclass
class Hooks:
    """How a host drives `train` beyond TrainConfig; every field is optional.

    event(dict)                  main process: start, log (every metric record), checkpoint, end
    should_stop() -> str|bool    after each step, on every process; any process's vote stops all of them
    checkpoints                  restore() -> context manager of the checkpoint to resume from (or None);
                                 save(step, write, final, record, accelerator) -> path, on every process, where
                                 write(root, keep, with_adapter) writes one under root (main process only)
    install_executor(model, acc) once, before training: e.g. a remote executor for the model's QNN
    after_step(step)             on every process, at the end of each step (logged and checkpointed)
    """

    event: Callable[[dict], None] | None = None
    should_stop: Callable[[], str | bool | None] | None = None
    checkpoints: object | None = None
    install_executor: Callable[[object, Accelerator], None] | None = None
    after_step: Callable[[int], None] | None = None


def lr_factor(cfg: TrainConfig):
    """The LR multiplier per optimizer step, for LambdaLR Not transformers'
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
    hooks: Hooks | None = None,
) -> TrainResult:
    """Train the model's trainable parameters in place; see TrainConfig and Hooks. Returns a TrainResult.

    `step_callback` and `should_stop` are Hooks.event and Hooks.should_stop. `tokenizer` is not needed by the
    loop itself (the data is already tokenised); it is saved beside the final adapter for convenience.
    """
    cfg = config or TrainConfig()
    hooks = dataclasses.replace(
        hooks or Hooks(),
        **{k: v for k, v in (("event", step_callback), ("should_stop", should_stop)) if v is not None},
    )
    if cfg.max_steps < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise ValueError("TrainConfig.max_steps, batch_size and grad_accum must be >= 1")
    device = cfg.device or default_device()
    prev_deterministic = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs this to be deterministic
        torch.use_deterministic_algorithms(True, warn_only=True)
    # A QNN's angles get their gradient in before_optimizer_step, never from backward: DDP must not wait for it.
    quantum = bool(getattr(getattr(model, "method", None), "runs_circuits", False))
    ddp = DistributedDataParallelKwargs(find_unused_parameters=quantum)
    accelerator = Accelerator(cpu=device.startswith("cpu"), mixed_precision=cfg.mixed_precision, kwargs_handlers=[ddp])
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
    takes = set(inspect.signature(hook).parameters) if callable(hook) else set()
    before_save = getattr(raw, "before_save", None)
    average = (lambda t: accelerator.reduce(t, "mean")) if accelerator.num_processes > 1 else None
    if hooks.install_executor is not None:
        hooks.install_executor(raw, accelerator)
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
    store = hooks.checkpoints or (LocalCheckpoints(out_dir, cfg.keep_checkpoints, cfg.resume) if out_dir else None)
    metrics_path = out_dir / cfg.metrics_file if out_dir else None
    state = {"history": [], "window": {"loss": 0.0, "steps": 0, "tokens": 0, "time": 0.0}, "elapsed_s": 0.0}
    step, resumed_from, last_ckpt, saved_step = 0, None, None, None
    with store.restore() if store is not None else contextlib.nullcontext() as ckpt:
        if ckpt is not None:
            saved = checkpoint.load(ckpt, raw, optimizer, scheduler)
            step, resumed_from, saved_step = saved["step"], str(ckpt), saved["step"]
            batches.load_state_dict(saved["data"])
            state = {k: saved[k] for k in state}
    if main and metrics_path:
        # Rewrite the log from the checkpoint: lines written after it by an interrupted run are dropped, so
        # the file always matches the weights.
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in state["history"]))

    def emit(event: dict) -> None:
        if hooks.event is not None and main:
            hooks.event(event)

    def log(record: dict) -> None:
        state["history"].append(record)
        if main and metrics_path:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        emit({"event": "log", **record})

    def run_eval() -> dict:
        with accelerator.autocast():
            return evaluate(raw, eval_data, cfg.eval_batch_size, cfg.eval_max_tokens, cfg.eval_max_batches)

    emit({"event": "start", "step": step, "max_steps": cfg.max_steps, "resumed_from": resumed_from})
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (cfg.progress and main), desc="train")
    t_start, reason, detail, last_eval = time.perf_counter(), "max_steps", None, None
    model.train()
    try:
        if cfg.eval_at_start and step == 0 and eval_data is not None:
            try:  # the first step reuses what this measures (same angles): it costs no extra circuits
                last_eval = run_eval()
                log({"step": 0, **{f"eval_{k}": v for k, v in last_eval.items()}})
            except ExecutionRefused:
                pass  # the first step meets the same refusal and reports it
            model.train()
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=accelerator.device)
            tokens = 0
            try:
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
                    hook_kw = {"step": step} if "step" in takes else {}
                    hook(**hook_kw, **({"average": average} if average is not None else {}))
            except ExecutionRefused as e:  # mid-step: the weights are the last step's; nothing more is saved
                reason, detail = "refused", f"{e} (during step {step + 1})"
                break
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

            vote = hooks.should_stop() if hooks.should_stop is not None else None
            stop = bool(vote)
            if accelerator.num_processes > 1:  # every rank must leave the loop at the same step
                stop = accelerator.reduce(torch.tensor(float(stop), device=accelerator.device), "sum").item() > 0
            if stop:
                detail = vote if isinstance(vote, str) else detail
            # A stop only adds a checkpoint: logging and evaluation follow the same schedule as an
            # uninterrupted run, so a stopped-and-resumed run writes exactly the same log.
            final = step >= cfg.max_steps
            do_eval = eval_data is not None and (final or (cfg.eval_every and step % cfg.eval_every == 0))
            save = store is not None and (final or stop or (cfg.save_every and step % cfg.save_every == 0))
            record = {"step": step}
            try:
                if save and callable(before_save):  # on every process (a collective executor call may happen
                    before_save()  # here), and before the record, so that it counts what this costs
                if do_eval or final or step % cfg.log_every == 0:
                    record = {
                        "step": step,
                        "epoch": batches.epoch + batches.index / batches.per_epoch,
                        "loss": w["loss"] / w["steps"],
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "tokens": w["tokens"],
                        "tokens_per_s": w["tokens"] / max(w["time"], 1e-9),
                        "step_s": w["time"] / w["steps"],
                        "elapsed_s": state["elapsed_s"] + time.perf_counter() - t_start,
                    }
                    if do_eval:
                        last_eval = run_eval()
                        record.update({f"eval_{k}": v for k, v in last_eval.items()})
                        model.train()
                    usage = quantum_usage(raw)
                    if usage is not None:
                        record.update(
                            {"shots": usage.get("shots", 0), "circuits": usage.get("circuits", 0), "quantum": usage}
                        )
                    state["window"] = {"loss": 0.0, "steps": 0, "tokens": 0, "time": 0.0}
                    log(record)
                if save:
                    trainer_state = {**state, "elapsed_s": state["elapsed_s"] + time.perf_counter() - t_start}
                    trainer_state["data"] = batches.state_dict()

                    def write(root, keep, with_adapter, step=step, trainer_state=trainer_state):
                        return checkpoint.save(root, step, raw, optimizer, scheduler, trainer_state, keep, with_adapter)

                    # the adapter's own save (for users) only where a run ends: resuming needs just the rest
                    path = store.save(step, write, final or stop, record, accelerator)
                    last_ckpt, saved_step = path or last_ckpt, step
                    emit({"event": "checkpoint", "step": step, "path": last_ckpt})
            except ExecutionRefused as e:  # measuring the new angles for an evaluation or a checkpoint
                reason, detail = "refused", f"{e} (measuring the angles of step {step})"
                break
            if hooks.after_step is not None:
                hooks.after_step(step)
            if stop:
                reason = "stopped"
                break
    finally:
        bar.close()
        torch.use_deterministic_algorithms(prev_deterministic)
    if main and out_dir and tokenizer is not None and last_ckpt and checkpoint.is_adapter(raw):
        tokenizer.save_pretrained(Path(last_ckpt) / "adapter")
    emit({"event": "end", "step": step, "reason": reason, "checkpoint": last_ckpt, "detail": detail})
    return TrainResult(
        step=step,
        reason=reason,
        history=state["history"],
        eval=last_eval,
        checkpoint=last_ckpt,
        metrics_path=str(metrics_path) if metrics_path else None,
        train_s=time.perf_counter() - t_start,
        quantum=quantum_usage(raw),
        detail=detail,
        checkpoint_step=saved_step,
    )
