"""`train_loop_per_worker`: one data-parallel replica of a job, run by Ray Train's TorchTrainer.

It builds the model and data from the spec and runs qpeft_core's one training loop with what only Ray has,
plugged in as the loop's hooks: events go to the driver's EventBox, checkpoints go through
`ray.train.report` (a barrier all ranks call) and come back from `ray.train.get_checkpoint()` after a
restart, rank 0 votes to stop when the ledger cannot pay for another step, and the QNN's circuits go to the
job's quantum pool through `RemoteExecutor`. The gradient strategy stays in the trainer (QNN, in
qpeft_core): theta walks adapter -> strategy -> RemoteExecutor -> pool -> worker -> executor. The replicas
share one QNN: dL/dp is averaged in the loop, rank 0 runs each call and broadcasts the answer, so the QPU
sees one forward and one gradient call per step whatever the number of replicas.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import replace
from pathlib import Path

import ray
import ray.train
import torch
import torch.distributed as dist
from accelerate.utils import set_seed

from qpeft_core.adapters import get_qpeft_model
from qpeft_core.quantum.backend import CircuitCall, ExecutionRefused, ExecutionResult, Executor, Usage
from qpeft_core.train import TrainConfig, load_data, load_model, make_lora_model, train
from qpeft_core.train.loop import Hooks
from services.contract import events
from services.contract.jobspec import JobSpec, runs_circuits


def uses_pool(spec: JobSpec) -> bool:
    """Whether the job's circuits run on the quantum pool: a method that runs circuits, unless its gradient
    is autograd, which differentiates the exact simulator in the trainer's own process."""
    return runs_circuits(spec.method) and spec.resolved_gradient() != "autograd"


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


class RemoteExecutor(Executor):
    """The job's quantum pool as every replica's executor. Rank 0 sends each call to the pool and broadcasts
    the answer; a status word goes first, so a refusal or a failure on rank 0 raises on every rank instead of
    leaving the others waiting in the collective. It runs circuits and nothing else."""

    def __init__(self, pool, info: dict, rank: int, world: int, device, say: Say):
        self.pool, self.rank, self.world, self.device, self.say = pool, rank, world, device, say
        self.ansatz, self.name, self.exact, self.max_qubits = (
            info[k] for k in ("ansatz", "name", "exact", "max_qubits")
        )
        self.since_check = [0, 0.0]  # shots and QPU seconds run since the last stop vote (rank 0)
        self.costliest = [0, 0.0]  # the most one step has taken so far

    def run(self, call: CircuitCall) -> ExecutionResult:
        size = call.circuits * self.ansatz.dim
        buf, usage, why = torch.zeros(1 + size, dtype=torch.float64), Usage(self.name), None
        if self.rank == 0:
            self.say.state("EXECUTING_QPU")
            try:
                out = ray.get(self.pool.run.remote(call))
                if isinstance(out, dict):
                    buf[0], why = 1, out["budget"]
                else:
                    probs, usage = out
                    buf[1:] = probs.detach().flatten().double()
                    seconds = usage.qpu_s if usage.qpu_s is not None else usage.qpu_s_estimated
                    self.since_check[0] += usage.shots
                    self.since_check[1] += seconds or 0.0
            except Exception as e:  # told to the other ranks below, then raised here too
                buf[0], why = 2, f"quantum pool call failed: {type(e).__name__}: {e}"
            self.say.state("TRAINING")
        if self.world > 1:
            buf = buf.to(self.device)
            dist.broadcast(buf, 0)
            buf = buf.cpu()
        if buf[0] == 1:
            raise ExecutionRefused(why or "rank 0 was refused shots")
        if buf[0] == 2:
            raise RuntimeError(why or "rank 0's quantum pool call failed")
        return ExecutionResult(buf[1:].view(call.circuits, self.ansatz.dim), usage)

    def out_of_budget(self, remaining, qpu_s_remaining=None) -> str | None:
        """(Rank 0, after each step.) Why the next step may not be paid for, or None: the shots or QPU seconds
        left are below the costliest step so far (adaptive strategies and update periods make steps differ)."""
        self.costliest = [max(a, b) for a, b in zip(self.costliest, self.since_check, strict=True)]
        self.since_check = [0, 0.0]
        shots, seconds = self.costliest
        if remaining is not None and shots and remaining < shots:
            return f"shot budget exhausted: {remaining} shots left, a step needs up to {shots}"
        if qpu_s_remaining is not None and seconds and qpu_s_remaining < seconds:
            return f"QPU-time budget exhausted: {qpu_s_remaining:.2f} s left, a step needs up to {seconds:.2f} s"
        return None


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
        if runs_circuits(spec.method):  # one gradient call per optimizer step, taken after dL/dp is averaged
            cfg = replace(cfg, quantum_grad="per_step")
        model = get_qpeft_model(model, cfg)
    return model, tok


def build_data(spec: JobSpec, tok):
    d = spec.dataset
    kw = {"task": spec.task, "mode": d.mode, "max_length": d.max_length, "text_field": d.text_field}
    kw |= {"label_field": d.label_field, "seed": spec.training.seed}
    # errors name the data set as the spec does (its id or shared name), never the server path
    train_data = load_data(spec.data_path("train"), tok, limit=d.limit, name=d.train, **kw)
    held_out = load_data(
        spec.data_path("eval") or spec.data_path("train"), tok, limit=d.eval_limit, name=d.eval or d.train, **kw
    )
    return train_data, held_out


def train_config(spec: JobSpec) -> TrainConfig:
    tc = spec.training
    return TrainConfig(
        max_steps=spec.max_steps,
        batch_size=tc.batch_size,
        grad_accum=tc.grad_accum,
        lr=tc.lr,
        weight_decay=tc.weight_decay,
        lr_scale=tc.lr_scale,
        warmup_steps=tc.warmup_steps,
        schedule=tc.schedule,
        max_grad_norm=tc.max_grad_norm,
        eval_every=tc.eval_every,
        eval_at_start=tc.eval_at_start,
        eval_batch_size=tc.eval_batch_size,
        eval_max_batches=tc.eval_max_batches,
        save_every=tc.save_every,
        seed=tc.seed,
        mixed_precision=tc.mixed_precision,
        device="cuda" if spec.scaling.use_gpu else "cpu",
        progress=False,
    )


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


class RayCheckpoints:
    """The loop's checkpoint store on Ray Train: every checkpoint is reported (all ranks: a barrier; rank 0
    carries the files) and a restarted group resumes from the last one reported. The artifacts (adapter and
    LoRA export) are rewritten beside the job at each one."""

    def __init__(self, raw, tok, artifact_dir: Path, rank: int):
        self.raw, self.tok, self.artifact_dir, self.rank = raw, tok, artifact_dir, rank
        self.artifacts: dict[str, Path] = {}

    @contextlib.contextmanager
    def restore(self):
        found = ray.train.get_checkpoint()
        if found is None:
            yield None
            return
        paths = artifact_paths(self.raw, self.artifact_dir)
        self.artifacts = paths if paths["adapter"].is_dir() else {}
        with found.as_directory() as d:
            yield Path(d)

    def save(self, step: int, write, final: bool, record: dict, accelerator) -> str:
        name = f"checkpoint-{step:08d}"
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if self.rank == 0:
                ckpt = ray.train.Checkpoint.from_directory(str(write(Path(tmp), 1, True)))
                self.artifacts = write_artifacts(self.raw, self.tok, self.artifact_dir)
            metrics = {k: v for k, v in record.items() if k != "quantum"}
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)
        if self.rank == 0:
            # Ray Train registers a report at its next poll of the workers (up to ~2 s): a group that fails
            # before that restarts from the checkpoint before, re-running steps and paying their shots again.
            # Waiting here makes every reported checkpoint the one a restart resumes from.
            ray.train.get_all_reported_checkpoints(ray.train.CheckpointConsistencyMode.COMMITTED)
        return name


def train_loop_per_worker(config: dict) -> None:
    spec = JobSpec.model_validate(config["spec"], context={"trusted": True})  # the driver's own spec file
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    say = Say(config.get("events"), rank)
    set_seed(spec.training.seed)
    model, tok = build_model(spec, "cpu")  # the loop moves it to the replica's device
    train_data, eval_data = build_data(spec, tok)
    pool, remote = config.get("pool"), None

    def install_executor(raw, accelerator):
        nonlocal remote
        if pool is not None:
            say.state("WAITING_QPU")
            info = ray.get(pool.start.remote(raw.method.ansatz))  # the pool's workers come up once per job
            remote = RemoteExecutor(pool, info, rank, world, accelerator.device, say)
            if rank == 0:
                where = ray.get(pool.placement.remote())
                nodes = ", ".join(f"{w['ip']} (pid {w['pid']})" for w in where)
                say("log", message=f"{len(where)} quantum workers ({info['name']}) on {nodes}", placement=where)
            raw.method.set_executor(remote)
        say.state("TRAINING")
        trainable, total = raw.get_nb_trainable_parameters()
        say("params", trainable=trainable, total=total)
        say("log", message=f"trainable parameters ({spec.method}): {trainable:,} of {total:,}")

    def pool_stats() -> dict:
        return ray.get(pool.stats.remote()) if pool is not None and rank == 0 else {}

    def on_event(event: dict) -> None:  # rank 0
        if event["event"] == "start" and event["resumed_from"]:
            say("log", message=f"resumed from the checkpoint of step {event['step']}")
        if event["event"] != "log":
            return
        stats = pool_stats()
        record = {k: v for k, v in event.items() if k != "event" and not k.startswith("eval_") and k != "quantum"}
        say(
            "progress",
            **record,
            max_steps=spec.max_steps,
            eval={k[5:]: v for k, v in event.items() if k.startswith("eval_")},
            shots_spent=stats.get("shots", 0),
            qpu_s=stats.get("qpu_s"),
            pool_calls=stats.get("forward", 0) + stats.get("gradient", 0),
        )

    def should_stop() -> str | None:
        if remote is None or rank != 0:
            return None
        stats = pool_stats()
        return remote.out_of_budget(stats.get("remaining"), stats.get("qpu_s_remaining"))

    def after_step(step: int) -> None:
        if config.get("step_callback"):
            config["step_callback"](step, rank)

    store = RayCheckpoints(model, tok, Path(config["artifact_dir"]), rank)
    hooks = Hooks(on_event, should_stop, store, install_executor, after_step)
    result = train(model, tok, train_data, eval_data, train_config(spec), hooks=hooks)

    if rank == 0:
        if result.reason == "max_steps":
            state, reason = "SUCCEEDED", f"trained {spec.max_steps} steps"
        elif result.reason == "stopped":
            why = result.detail or "shot budget exhausted"
            state, reason = "BUDGET_EXHAUSTED", f"{why}; stopped after step {result.step}"
        else:  # refused inside a step: the last checkpoint stands
            kept = result.checkpoint_step
            state = "BUDGET_EXHAUSTED"
            kept_text = f"; the checkpoint of step {kept} is kept" if kept else "; no checkpoint was written yet"
            reason = result.detail + kept_text
        for name, path in store.artifacts.items():
            say("artifact", name=name, path=str(path))
        say("result", state=state, reason=reason)
        say.flush()  # the driver takes the events once fit() returns: they must all be there by then
