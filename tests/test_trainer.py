"""The trainer job on a real Ray cluster (the session's `ray_cluster`, resources qpu=2): Ray Train TorchTrainer
with Accelerate per worker, QPA through the quantum pool, checkpoints, failures, budgets, the entry point.

A 2-replica fit costs 25-40 s of fixed overhead on 2 cores, so the assertions are gathered into few fits.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import ray.cloudpickle
import torch
from safetensors.torch import load_file

from services.contract import events
from services.contract.jobspec import JobSpec
from services.contract.ledger import InMemoryLedger
from services.trainer.run import TrainerRun

ROOT = Path(__file__).resolve().parents[1]
ray_test = pytest.mark.usefixtures("ray_cluster")

# Ray workers cannot import this module by name (pytest's importlib mode): ship what it defines by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

QPA = {"r": 2, "n_mlp": 64, "qnn_depth": 2, "mapping_widths": [16, 16]}  # 5 qubits, 10 angles on tiny-gpt2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "qubits", "rotate"]
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(160)]
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def make_spec(corpus, **over) -> JobSpec:
    spec = {
        "base_model": "tiny-gpt2",
        "dataset": {"train": str(corpus), "max_length": 32, "eval_limit": 16},
        "method": "qpa",
        "method_config": QPA,
        "executor": "exact",
        # exact circuits on the pool (autograd, which "auto" picks for exact, differentiates in the trainer)
        "gradient": "parameter_shift",
        "max_steps": 6,
        "training": {"batch_size": 4, "lr": 1e-2, "save_every": 2, "eval_max_batches": 2, "lr_scale": {"gate": 3}},
        "scaling": {"num_workers": 2},
    }
    for key, value in over.items():
        merge = isinstance(spec.get(key), dict) and key != "method_config"
        spec[key] = {**spec[key], **value} if merge else value
    return JobSpec.model_validate(spec)


def fit(spec, tmp, name, **kw):
    seen = []
    run = TrainerRun(
        spec, storage_path=str(tmp / "ray"), artifact_dir=str(tmp / name), name=name, on_event=seen.append, **kw
    )
    return run, run.run()


def trained(checkpoint_dir) -> dict:
    return load_file(str(Path(checkpoint_dir) / "trainable.safetensors"))


def of_type(result, kind):
    return [e for e in result.events if e["type"] == kind]


@pytest.fixture(scope="module")
def baseline(ray_cluster, corpus, tmp_path_factory):
    """QPA, exact executor, 2 replicas, 6 steps, a checkpoint every 2, an evaluation before step 1: the
    reference run (the resumed run of the kill test skips that evaluation and must still end the same)."""
    tmp = tmp_path_factory.mktemp("baseline")
    run, result = fit(make_spec(corpus, training={"eval_at_start": True}), tmp, "baseline")
    return result


@ray_test
def test_two_replicas_share_one_pool_call_per_step(baseline):
    r = baseline
    assert r.state == "SUCCEEDED", r.reason
    # 2 replicas, 6 steps: 6 gradient calls, and 6 forward calls. The pool runs a forward only when the angles
    # moved: that is 7 angle sets (initial, after each step) less one, as step 1 leaves them where they were
    # (B's gate starts at 0, so dL/dp = 0 and Adam's first update of theta is 0).
    assert (r.pool_stats["forward"], r.pool_stats["gradient"]) == (6, 6)
    # the evaluation before step 1 (eval_at_start) measured the initial angles, which step 1 then reused
    start, *progress = of_type(r, "progress")
    assert start["step"] == 0 and start["eval"]["ppl"] > progress[-1]["eval"]["ppl"] > 1
    assert [e["step"] for e in progress] == [1, 2, 3, 4, 5, 6]
    calls = [0] + [e["pool_calls"] for e in progress]
    assert all(
        1 <= b - a <= 3 for a, b in zip(calls, calls[1:], strict=False)
    )  # gradient + forward + checkpoint's forward
    assert all(e["max_steps"] == 6 and e["loss"] > 0 and e["tokens_per_s"] > 0 for e in progress)
    assert progress[-1]["eval"]["ppl"] > 1 and progress[-1]["pool_calls"] == 12
    subs = {e["sub_state"] for e in of_type(r, "state")}
    assert subs == {"WAITING_QPU", "EXECUTING_QPU", "TRAINING"}
    assert r.events[-1] == of_type(r, "result")[0] and r.events[-1]["state"] == "SUCCEEDED"
    # checkpoints through Ray Train: the last one holds the trainable state, optimizer, data position, adapter
    ck = Path(r.checkpoint)
    assert ck.name == "checkpoint-00000006"
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["data"]["index"] > 0 and len(state["history"]) == 7  # steps 0..6
    assert (ck / "state.pt").is_file() and (ck / "adapter" / "adapter_config.json").is_file()
    groups = torch.load(ck / "state.pt", weights_only=False)["optimizer"]["param_groups"]
    # training.lr_scale {"gate": 3}: the gates in a group of their own (theta and 3 Linear layers in the other)
    assert [len(g["params"]) for g in groups] == [7, 1] and (groups[0]["initial_lr"], groups[1]["initial_lr"]) == (
        1e-2,
        3e-2,
    )
    assert set(r.artifacts) == {"adapter", "lora"}
    assert (Path(r.artifacts["lora"]) / "adapter_config.json").is_file()
    assert json.loads((Path(r.artifacts["lora"]) / "adapter_config.json").read_text())["peft_type"] == "LORA"


def kill_rank1_once(marker):
    """A step callback: rank 1 kills its own process after step 3, once per marker file."""

    def callback(step, rank):
        if rank == 1 and step == 3 and not os.path.exists(marker):
            Path(marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)

    return callback


@ray_test
def test_killed_workers_resume_to_the_same_adapter(baseline, corpus, tmp_path):
    """One run, two failures: a quantum worker is killed after step 2 (the pool retries elsewhere while Ray
    restarts it), and trainer rank 1 kills itself after step 3 (Ray Train restarts the group from the step-2
    checkpoint, FailureConfig(max_failures=1)). Exact executor: the final adapter equals the baseline's."""
    killed = []

    def kill_quantum_worker(event):
        if event["type"] == "progress" and event["step"] == 2 and not killed:
            pid = ray.get(run.pool.worker_pids.remote())[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    spec = make_spec(corpus)
    run = TrainerRun(
        spec,
        storage_path=str(tmp_path / "ray"),
        artifact_dir=str(tmp_path / "art"),
        name="killed",
        on_event=kill_quantum_worker,
        step_callback=kill_rank1_once(str(tmp_path / "killed-once")),
    )
    r = run.run()
    assert r.state == "SUCCEEDED", r.reason
    assert killed and (tmp_path / "killed-once").exists()
    resumed = [e for e in of_type(r, "log") if "resumed from the checkpoint of step 2" in e["message"]]
    assert resumed, "Ray Train did not restore the step-2 checkpoint"
    assert [e["step"] for e in of_type(r, "progress")] == [1, 2, 3, 3, 4, 5, 6]  # step 3 ran twice
    want, got = trained(baseline.checkpoint), trained(r.checkpoint)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k


@ray_test
def test_aer_budget_exhausted_mid_run_keeps_last_checkpoint(corpus, tmp_path, monkeypatch):
    """Aer sampler, 64 shots, parameter-shift, 1 replica, the control plane's SQL ledger (QPEFT_DATABASE_URL):
    the job's account is unlimited, its tenant's holds 3000 shots. A step costs 64 (forward) + 16 x 64 (8 angles
    shifted both ways) = 1088 shots. Step 1 spends 1088, step 2 1024 + 64 (its checkpoint measures the new
    angles): with 3000 - 2112 = 888 left after step 2's update, step 3 cannot be paid for, so the run stops
    cleanly there with its step-2 checkpoint, having spent 2176 shots."""
    from services.contract.sql_ledger import SQLLedger
    from services.control_plane.db import migrate

    url = f"sqlite:///{tmp_path / 'qpeft.db'}"
    migrate(url)
    ledger = SQLLedger(url)
    ledger.set_budget("acme", 3000)
    ledger.set_budget("job:b", None, parent="acme")
    monkeypatch.setenv("QPEFT_DATABASE_URL", url)
    monkeypatch.setenv("QPEFT_LEDGER_KEY", "job:b")
    spec = make_spec(
        corpus,
        executor="aer",
        shots=64,
        gradient="parameter_shift",
        scaling={"num_workers": 1},
        training={"save_every": 1},
    )
    run, r = fit(spec, tmp_path, "budget")
    assert r.state == "BUDGET_EXHAUSTED" and "budget" in r.reason and "after step 2" in r.reason, r.reason
    assert r.pool_stats["shots"] == 2176 and r.pool_stats["remaining"] == 3000 - 2176
    acme = ledger.account("acme")
    assert (acme.spent, acme.lost, acme.reserved) == (2176, 0, 0)  # every reservation settled in the database
    assert Path(r.checkpoint).name == "checkpoint-00000002"
    assert (Path(r.checkpoint) / "adapter" / "adapter_config.json").is_file()
    progress = of_type(r, "progress")
    assert [e["step"] for e in progress] == [1, 2] and progress[-1]["shots_spent"] == 2176
    assert r.events[-1]["type"] == "result" and r.events[-1]["state"] == "BUDGET_EXHAUSTED"
    assert set(r.artifacts) == {"adapter", "lora"}


def sql_ledger(tmp_path, monkeypatch, job_key: str):
    from services.contract.sql_ledger import SQLLedger
    from services.control_plane.db import migrate

    url = f"sqlite:///{tmp_path / 'qpeft.db'}"
    migrate(url)
    monkeypatch.setenv("QPEFT_DATABASE_URL", url)
    monkeypatch.setenv("QPEFT_LEDGER_KEY", job_key)
    return SQLLedger(url)


@ray_test
def test_qpu_seconds_forecast_matches_what_the_pool_commits(corpus, tmp_path, monkeypatch):
    """A fake IBM device (local mode: nothing reports usage, so every share commits the time model's estimate,
    marked as estimated): the forecast's QPU seconds are within 20% of the sum the pool commits."""
    from services.control_plane.forecast import forecast

    ledger = sql_ledger(tmp_path, monkeypatch, "job:q")
    ledger.set_budget("acme", None)
    ledger.set_budget("job:q", None, parent="acme")
    spec = make_spec(
        corpus, executor="fake-ibm:FakeManilaV2", shots=64, max_steps=3, scaling={"num_workers": 1}, training={}
    )
    fc = forecast(spec)
    _, r = fit(spec, tmp_path, "qpu")
    assert r.state == "SUCCEEDED", r.reason
    job = ledger.account("job:q")
    assert job.spent == r.pool_stats["shots"] == fc["shots"]
    assert job.qpu_s_spent == pytest.approx(job.qpu_s_estimated) and job.qpu_s_spent > 0  # all estimated
    assert abs(fc["qpu_seconds"] - job.qpu_s_spent) <= 0.2 * job.qpu_s_spent, (fc["qpu_seconds"], job.qpu_s_spent)


@ray_test
def test_qpu_seconds_budget_stops_a_running_job(corpus, tmp_path, monkeypatch):
    """The tenant may spend 10 QPU seconds on a fake IBM device; a step costs ~6.4 s at first (forward and
    gradient jobs, ~3 s fixed each), then ~3.3 s: the run stops BUDGET_EXHAUSTED on QPU time with its last
    checkpoint, having spent no more than the limit."""
    ledger = sql_ledger(tmp_path, monkeypatch, "job:t")
    ledger.set_budget("acme", None, qpu_s=10.0)
    ledger.set_budget("job:t", None, parent="acme")
    spec = make_spec(
        corpus,
        executor="fake-ibm:FakeManilaV2",
        shots=64,
        max_steps=6,
        scaling={"num_workers": 1},
        training={"save_every": 1},
    )
    _, r = fit(spec, tmp_path, "qpu-budget")
    assert r.state == "BUDGET_EXHAUSTED" and "QPU-time budget" in r.reason, r.reason
    acme = ledger.account("acme")
    assert 0 < acme.qpu_s_spent <= 10.0 and acme.qpu_s_reserved == 0
    assert r.checkpoint is not None and int(Path(r.checkpoint).name.split("-")[1]) < 6


class SilentLedger(InMemoryLedger):
    """A ledger that cannot say what is left (as when other jobs of the tenant spend at the same time), so the
    trainer cannot see the end coming and a reservation is refused inside a step."""

    def remaining(self, key):
        return None


@ray_test
def test_budget_refused_inside_a_step(corpus, tmp_path):
    """1500 shots: step 1 spends 1088; step 2's gradient (1024) is refused. The run stops as BUDGET_EXHAUSTED
    with the step-1 checkpoint and that checkpoint's adapter as its artifacts."""
    spec = make_spec(
        corpus,
        executor="aer",
        shots=64,
        gradient="parameter_shift",
        scaling={"num_workers": 1},
        training={"save_every": 1},
    )
    _, r = fit(spec, tmp_path, "refused", make_ledger=lambda: SilentLedger({"t": 1500}), ledger_key="t")
    assert r.state == "BUDGET_EXHAUSTED" and "during step 2" in r.reason, r.reason
    assert "the checkpoint of step 1 is kept" in r.reason and Path(r.checkpoint).name == "checkpoint-00000001"
    assert r.pool_stats["shots"] == 1088
    assert set(r.artifacts) == {"adapter", "lora"} and Path(r.artifacts["lora"], "adapter_config.json").is_file()


def test_entry_point_end_to_end(ray_cluster, corpus, tmp_path):
    """`python -m services.trainer --spec job.json` as the control plane runs it: a subprocess attached to the
    session cluster through RAY_ADDRESS, events parsed from its stdout. The classical LoRA baseline goes
    through the same trainer, without a pool."""
    spec = make_spec(
        corpus,
        method="lora",
        method_config={"r": 4},
        max_steps=3,
        scaling={"num_workers": 1},
        training={"lr_scale": {}},
    )
    path = spec.dump(tmp_path / "job.json")
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_cluster.address,
        "QPEFT_JOB_ID": "e2e",
        "QPEFT_TENANT": "acme",
        "QPEFT_ARTIFACT_DIR": str(tmp_path / "artifacts"),
    }
    env.pop("QPEFT_DATABASE_URL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "services.trainer", "--spec", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    evs = [e for e in map(events.parse, proc.stdout.splitlines()) if e]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kinds = [e["type"] for e in evs]
    assert kinds[0] == "log" and kinds[-1] == "result" and kinds.count("result") == 1
    assert any(e["type"] == "log" and e["message"].startswith("trainable parameters (lora): ") for e in evs)
    (params,) = [e for e in evs if e["type"] == "params"]
    assert 0 < params["trainable"] < params["total"]
    assert evs[-1]["state"] == "SUCCEEDED" and evs[-1]["reason"] == "trained 3 steps"
    assert [e["sub_state"] for e in evs if e["type"] == "state"] == ["TRAINING"]  # no quantum pool for LoRA
    progress = [e for e in evs if e["type"] == "progress"]
    assert [e["step"] for e in progress] == [1, 2, 3] and progress[-1]["shots_spent"] == 0
    assert set(progress[-1]) >= {"loss", "eval", "tokens_per_s", "time", "max_steps", "qpu_s"}
    arts = {e["name"]: Path(e["path"]) for e in evs if e["type"] == "artifact"}
    assert arts == {"adapter": tmp_path / "artifacts" / "adapter", "lora": tmp_path / "artifacts" / "adapter"}
    cfg = json.loads((arts["lora"] / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    assert (tmp_path / "ray" / "qpeft-e2e").is_dir()  # Ray Train's checkpoints next to the artifacts
