"""`train_loop_per_worker`: one data-parallel replica of a job, run by Ray Train's TorchTrainer.

It is qpeft_core.train's Accelerate loop adapted to Ray Train: the same model building, data, Batches,
schedule and checkpoint format, but every checkpoint goes through `ray.train.report` (a barrier all ranks
call), a restarted worker group resumes from `ray.train.get_checkpoint()`, and for QPA the replicas share
one QNN: rank 0 asks the pool for p(theta) and broadcasts it, dL/dp is all-reduced, and rank 0 asks the
pool for the VJP once (`SharedQNN`). So the QPU sees one forward and one gradient call per step whatever
the number of replicas.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import ray
import ray.train
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed

from qpeft_core.adapters import get_qpeft_model
from qpeft_core.quantum.backend import ExecutionResult, Usage
from qpeft_core.train import Batches, TrainConfig, checkpoint, evaluate, load_data, load_model, make_lora_model
from qpeft_core.train.loop import lr_factor, param_groups
from services.contract import events
from services.contract.jobspec import JobSpec


class BudgetStop(RuntimeError):
    """The ledger refused the shots of a pool call: the run stops, keeping its last checkpoint."""


class Say:
    """Rank 0's events, sent to the driver's EventBox without waiting (one caller's calls run in order);
    `flush()` waits for all of them. Sub-states are sent only when they change."""

    def __init__(self, box, rank: int):
        self.box, self.rank, self.sub, self.last = box, rank, None, None

    def __call__(self, type: str, **fields):
        if self.rank == 0 and self.box is not None:
            self.last = self.box.put.remote(events.make(type, **fields))

    def flush(self):
        if self.last is not None:
            ray.get(self.last)

    def state(self, sub: str):
        if sub != self.sub:
            self.sub = sub
            self(type="state", sub_state=sub)


class SharedQNN:
    """Every replica's QPA executor and gradient strategy at once (QPAMethod calls `probabilities` for the
    forward and `vjp` from `before_optimizer_step`). Rank 0 calls the pool; the answer reaches the other
    ranks by broadcast, with a status word first so that a refusal or failure on rank 0 makes every rank
    raise instead of leaving the others waiting in the collective."""

    def __init__(self, pool, info: dict, rank: int, world: int, device, say: Say):
        self.pool, self.rank, self.world, self.device, self.say = pool, rank, world, device, say
        self.ansatz, self.name, self.exact, self.max_qubits = (
            info[k] for k in ("ansatz", "name", "exact", "max_qubits")
        )
        self.cost = {"probabilities": 0, "vjp": 0}  # shots of the latest call of each kind (rank 0)

    def _shared(self, call: str, size: int, *args):
        buf, usage, why = torch.zeros(1 + size, dtype=torch.float64), Usage(self.name), None
        if self.rank == 0:
            self.say.state("EXECUTING_QPU")
            try:
                out = ray.get(getattr(self.pool, call).remote(*args))
                if isinstance(out, dict):
                    buf[0], why = 1, out["budget"]
                else:
                    value, usage = out
                    buf[1:] = value.detach().flatten().double()
                    self.cost[call] = usage.shots
            except Exception as e:  # told to the other ranks below, then raised here too
                buf[0], why = 2, f"quantum pool {call} failed: {type(e).__name__}: {e}"
            self.say.state("TRAINING")
        if self.world > 1:
            buf = buf.to(self.device)
            dist.broadcast(buf, 0)
            buf = buf.cpu()
        if buf[0] == 1:
            raise BudgetStop(why or "rank 0 was refused shots")
        if buf[0] == 2:
            raise RuntimeError(why or "rank 0's quantum pool call failed")
        return buf[1:], usage

    def probabilities(self, thetas, shots=None) -> ExecutionResult:
        B, dim = thetas.shape[0], self.ansatz.dim
        flat, usage = self._shared("probabilities", B * dim, thetas.detach().cpu(), shots)
        return ExecutionResult(flat.view(B, dim), usage)

    def vjp(self, backend, thetas, grad_probs, shots=None):
        g = grad_probs.detach().to(self.device, torch.float64)
        if self.world > 1:  # each replica's loss is a mean over its own batch: average, as DDP does
            dist.all_reduce(g)
            g /= self.world
        flat, usage = self._shared("vjp", thetas.numel(), thetas.detach().cpu(), g.cpu(), shots)
        return flat.view(thetas.shape).to(thetas.dtype), usage

    def out_of_budget(self, remaining) -> str | None:
        """(Rank 0.) Why the next step cannot be paid for, or None: a forward and a gradient call."""
        need = self.cost["probabilities"] + self.cost["vjp"]
        if remaining is None or need == 0 or remaining >= need:
            return None
        return f"shot budget exhausted: {remaining} shots left, a step needs {need}"


def build_model(spec: JobSpec, device):
    model, tok = load_model(
        spec.model_location(), spec.task, spec.dataset.num_labels, device=device, seed=spec.training.seed
    )
    cfg = spec.adapter_config()
    if spec.method == "lora":
        model = make_lora_model(
            model, cfg.target_modules, cfg.r, cfg.lora_alpha, cfg.lora_dropout, spec.task, seed=spec.training.seed
        )
    else:
        if spec.method == "qpa":  # one gradient call per optimizer step, taken after dL/dp is all-reduced
            cfg = replace(cfg, quantum_grad="per_step")
        model = get_qpeft_model(model, cfg)
    return model, tok


def build_data(spec: JobSpec, tok):
    d = spec.dataset
    kw = {"task": spec.task, "mode": d.mode, "max_length": d.max_length, "text_field": d.text_field}
    kw |= {"label_field": d.label_field, "seed": spec.training.seed}
    # errors name the data set as the spec does (its id or shared name), never the server path
    train = load_data(spec.data_path("train"), tok, limit=d.limit, name=d.train, **kw)
    held_out = load_data(
        spec.data_path("eval") or spec.data_path("train"), tok, limit=d.eval_limit, name=d.eval or d.train, **kw
    )
    return train, held_out


def artifact_paths(raw, root: Path) -> dict[str, Path]:
    # a LoRA job's adapter already is a plain PEFT LoRA
    return {"adapter": root / "adapter", "lora": root / ("lora" if hasattr(raw, "export_lora") else "adapter")}


def write_artifacts(raw, tok, root: Path) -> dict[str, Path]:
    """The adapter as saved by its own save_pretrained, and as a plain PEFT LoRA. Written at every checkpoint,
    so a run stopped inside a step still leaves its last checkpoint's adapter."""
    paths = artifact_paths(raw, root)
    raw.save_pretrained(paths["adapter"])
    tok.save_pretrained(paths["adapter"])
    if hasattr(raw, "export_lora"):
        raw.export_lora(paths["lora"])
    return paths


def train_loop_per_worker(config: dict) -> None:
    spec = JobSpec.model_validate(config["spec"], context={"trusted": True})  # the driver's own spec file
    tc = spec.training
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    say = Say(config.get("events"), rank)
    torch.use_deterministic_algorithms(True, warn_only=True)
    # QPA's angles get their gradient from the pool in the hook, never from backward: DDP must not wait for it
    ddp = DistributedDataParallelKwargs(find_unused_parameters=spec.method == "qpa")
    acc = Accelerator(cpu=not spec.scaling.use_gpu, mixed_precision=tc.mixed_precision, kwargs_handlers=[ddp])
    set_seed(tc.seed)
    model, tok = build_model(spec, acc.device)
    train_data, eval_data = build_data(spec, tok)

    shared, pool = None, config.get("pool")
    if spec.method == "qpa":
        say.state("WAITING_QPU")
        info = ray.get(pool.start.remote(model.method.ansatz))  # the pool's workers come up once per job
        shared = SharedQNN(pool, info, rank, world, acc.device, say)
        if rank == 0:
            where = ray.get(pool.placement.remote())
            nodes = ", ".join(f"{w['ip']} (pid {w['pid']})" for w in where)
            say("log", message=f"{len(where)} quantum workers ({info['name']}) on {nodes}", placement=where)
        model.method.set_backend(shared)
        model.method.qnn.strategy = shared
    say.state("TRAINING")

    params = [p for p in model.parameters() if p.requires_grad]
    lr_cfg = TrainConfig(
        max_steps=spec.max_steps, lr=tc.lr, lr_scale=tc.lr_scale, warmup_steps=tc.warmup_steps, schedule=tc.schedule
    )
    opt = torch.optim.AdamW(param_groups(model, lr_cfg), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(lr_cfg))  # stepped once per optimizer step
    model, opt = acc.prepare(model, opt)
    raw = acc.unwrap_model(model)
    hook = getattr(raw, "before_optimizer_step", None)
    batches = Batches(len(train_data), tc.batch_size, tc.seed, True, True, rank, world)

    step, history, artifacts, saved_at = 0, [], {}, None
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            saved = checkpoint.load(d, raw, opt, sched)
        step, history = saved["step"], saved.get("history", [])
        batches.load_state_dict(saved["data"])
        found = artifact_paths(raw, Path(config["artifact_dir"]))
        artifacts, saved_at = ({}, None) if not found["adapter"].is_dir() else (found, step)
        say("log", message=f"rank {rank}: resumed from the checkpoint of step {step}")

    def pool_stats():
        return ray.get(pool.stats.remote()) if shared is not None and rank == 0 else {}

    trainable, total = raw.get_nb_trainable_parameters()
    say("params", trainable=trainable, total=total)
    say("log", message=f"trainable parameters ({spec.method}): {trainable:,} of {total:,}")
    if tc.eval_at_start and step == 0:
        try:  # collective; the first step reuses these probabilities (same angles), so this costs no extra shots
            if shared is not None:
                raw.method.quantum_probs()
            ev = evaluate(raw, eval_data, tc.eval_batch_size, None, tc.eval_max_batches) if rank == 0 else {}
            history.append({"step": 0, **{f"eval_{k}": v for k, v in ev.items()}})
            say("progress", step=0, max_steps=spec.max_steps, eval=ev, shots_spent=pool_stats().get("shots", 0))
        except BudgetStop:
            pass  # the first step meets the same refusal and reports it

    state, reason, inside = "SUCCEEDED", f"trained {spec.max_steps} steps", False  # inside: stopped mid-step
    model.train()
    while step < spec.max_steps:
        t0 = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64, device=acc.device)  # loss, tokens, stop votes
        try:
            for micro in range(tc.grad_accum):
                batch = {k: v.to(acc.device) for k, v in train_data.batch(batches.next()).items()}
                sums[1] += int(batch["attention_mask"].sum())
                last = micro == tc.grad_accum - 1  # DDP all-reduces on the last micro-batch only
                with contextlib.nullcontext() if last else acc.no_sync(model):
                    loss = model(**batch).loss / tc.grad_accum
                    acc.backward(loss)
                sums[0] += loss.detach().double()
            if callable(hook):
                hook()  # QPA: all-reduce dL/dp, one VJP on the pool (SharedQNN.vjp)
        except BudgetStop as e:
            state, reason, inside = "BUDGET_EXHAUSTED", f"{e} (during step {step + 1})", True
            break
        grad_norm = acc.clip_grad_norm_(params, tc.max_grad_norm or math.inf)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1

        stop_why = shared.out_of_budget(pool_stats().get("remaining")) if shared and rank == 0 else None
        sums[2] = float(stop_why is not None)
        if world > 1:
            dist.all_reduce(sums)
        stop = bool(sums[2] > 0)
        final = step >= spec.max_steps
        do_eval = final or stop or (tc.eval_every > 0 and step % tc.eval_every == 0)
        save = final or stop or (tc.save_every > 0 and step % tc.save_every == 0)
        if shared is not None and (do_eval or save):
            try:  # collective: p(new theta) on every rank, so that rank-0-only work below never needs the pool
                raw.method.quantum_probs()
            except BudgetStop as e:
                state, reason, inside = "BUDGET_EXHAUSTED", f"{e} (measuring the angles of step {step})", True
                break
        step_s = time.perf_counter() - t0
        ev = evaluate(raw, eval_data, tc.eval_batch_size, None, tc.eval_max_batches) if do_eval and rank == 0 else {}
        stats = pool_stats()
        record = {
            "step": step,
            "loss": float(sums[0]) / world,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": float(sums[1]) / step_s,
            "step_s": step_s,
            "shots_spent": stats.get("shots", 0),
            "qpu_s": stats.get("qpu_s"),
        }
        history.append({**record, **{f"eval_{k}": v for k, v in ev.items()}})
        say(
            "progress",
            max_steps=spec.max_steps,
            eval=ev,
            pool_calls=stats.get("forward", 0) + stats.get("gradient", 0),
            **record,
        )

        if save:
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    extra = {"data": batches.state_dict(), "history": history, "shots_spent": record["shots_spent"]}
                    ckpt = checkpoint.save(tmp, step, raw, opt, sched, extra, keep=1, save_adapter=True)
                    ckpt = ray.train.Checkpoint.from_directory(str(ckpt))
                    artifacts, saved_at = write_artifacts(raw, tok, Path(config["artifact_dir"])), step
                # every rank reports (a barrier); only rank 0 carries the checkpoint
                ray.train.report(
                    {**record, **{f"eval_{k}": v for k, v in ev.items()}},
                    checkpoint=ckpt,
                    checkpoint_dir_name=f"checkpoint-{step:08d}",
                )
            if rank == 0:
                # Ray Train registers a report at its next poll of the workers (up to ~2 s): a group that
                # fails before that restarts from the checkpoint before, re-running steps and paying their
                # shots again. Waiting here makes every reported checkpoint the one a restart resumes from.
                ray.train.get_all_reported_checkpoints(ray.train.CheckpointConsistencyMode.COMMITTED)
        if config.get("step_callback"):
            config["step_callback"](step, rank)
        if stop:
            state, reason = "BUDGET_EXHAUSTED", f"{stop_why or 'shot budget exhausted'}; stopped after step {step}"
            break

    if rank == 0:
        if inside:
            reason += f"; the checkpoint of step {saved_at} is kept" if saved_at else "; no checkpoint was written yet"
        for name, path in artifacts.items():
            say("artifact", name=name, path=str(path))
        say("result", state=state, reason=reason)
        say.flush()  # the driver takes the events once fit() returns: they must all be there by then
