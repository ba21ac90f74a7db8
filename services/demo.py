"""The service part of `make demo`: the QPA fine-tune as jobs through the embedded control plane.

Starts the control plane in embedded mode (SQLite and a local Ray head under a temporary data dir, the API
and dashboard on a free 127.0.0.1 port), creates a tenant with a small shot budget, uploads a local text file
as the tenant's data set (with the CLI's client code), submits on it a QPA job on a shot-based simulator (Aer,
parameter shift) and one on the exact executor over the REST API, follows both, downloads the LoRA artifact,
generates from it with plain transformers + peft, and stops everything it started.

`python -m services.demo` is `make demo`: qpeft_core.demo's library parts first, then this part
(`--skip-service` leaves it out). qpeft_core never imports services.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import tempfile
import threading
import time
import zipfile
from pathlib import Path

from services.control_plane.models import FINAL_STATES
from services.control_plane.ray_jobs import free_port


def _follow(client, job: dict, console) -> dict:
    """Poll the job (no SSE: an open stream would hold the server's shutdown) with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [
        TextColumn("[bold]{task.fields[state]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  shots {task.fields[shots]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(job["id"], total=job["max_steps"], state=job["state"], loss="-", shots="0")
        while job["state"] not in FINAL_STATES:
            time.sleep(0.5)
            job = client.get(f"/v1/jobs/{job['id']}").raise_for_status().json()
            sub = f" {job['sub_state']}" if job.get("sub_state") else ""
            loss = "-" if job["loss"] is None else f"{job['loss']:.4f}"
            bar.update(
                task, completed=job["step"], state=job["state"] + sub, loss=loss, shots=f"{job['shots']['spent']:,}"
            )
    return job


def _report(client, job: dict, console, summary: dict) -> None:
    """The trainer's parameter counts and the perplexity of its evaluations (from its metrics)."""
    if job.get("parameters"):
        n = job["parameters"]
        console.print(f"trainable parameters ({job['spec']['method']}): {n['trainable']:,} of {n['total']:,}")
    points = client.get(f"/v1/jobs/{job['id']}/metrics").raise_for_status().json()["points"]
    ppl = [(p["step"], p["eval"]["ppl"]) for p in points if p["eval"] and "ppl" in p["eval"]]
    if ppl:
        console.print("perplexity on the held-out text: " + " -> ".join(f"{v:.2f} (step {s})" for s, v in ppl))
        summary.setdefault("perplexity", {})[job["id"]] = ppl


def run_jobs(
    c,
    console,
    model: str,
    corpus: Path,
    work: Path,
    device="cpu",
    steps=10,
    quick=False,
    set_budget=None,
    eval_data=None,
) -> dict:
    """The demo's jobs on the server `c` talks to with a tenant's key: `corpus` uploaded as `qpeft data upload`
    does, a shot-adaptive QPA job on a noisy fake IBM device and one on the exact executor, each followed to its
    end, then the exact job's LoRA artifact downloaded into `work` and used with plain transformers + peft.
    `set_budget(shots)`, where the caller may set the tenant's budget, gets the shot-based job's forecast first.
    Returns the summary: the data set, each job's (id, state, step, shots), the budget, perplexities, the sample."""
    import torch
    import transformers

    from qpeft_core.adapters.io import load_peft_lora
    from qpeft_core.train import load_model
    from services.cli import upload_dataset

    summary: dict = {}
    uploaded = upload_dataset(c, corpus)
    summary["dataset"] = {k: uploaded[k] for k in ("id", "format", "rows", "sha256")}
    console.print(
        f"uploaded {corpus.name}: data set {uploaded['id']} ({uploaded['format']}, {uploaded['rows']:,} rows)"
    )

    max_length, batch = (64, 2) if quick else (128, 4)
    dataset = {"train": uploaded["id"], "eval": eval_data or "wikitext-2-test", "max_length": max_length, "limit": 64}
    base = {
        "base_model": model,
        "dataset": dataset,
        "method": "qpa",
        # 2048 numbers per basis state suit SmolLM2's 230,400; a tiny test model needs far fewer
        "method_config": {"r": 4, "quantum_grad": "per_step", "n_mlp": 64 if model.startswith("tiny") else 2048},
        "training": {"batch_size": batch, "lr": 2e-3, "warmup_steps": 1, "eval_max_batches": 2},
    }
    # A 7-qubit IBM device simulated with its noise (qiskit-ibm-runtime's local mode), so the job has a QPU
    # time and a cost; shot-frugal: parameter shift with shots per angle from the estimated noise, at most 256
    sampled = {**base, "name": "qpa on fake ibm_nairobi, shot-adaptive", "executor": "fake-ibm:FakeNairobiV2"}
    sampled.update(shots=256, gradient="shot_adaptive", gradient_options={"min_shots": 32})
    sampled["max_steps"] = 2 if quick else 3
    naive = c.post("/v1/estimate", json={**sampled, "gradient": "parameter_shift", "gradient_options": {}})
    naive = naive.raise_for_status().json()
    exact = {**base, "name": "qpa exact", "executor": "exact", "max_steps": steps}
    exact["training"] = {**base["training"], "eval_at_start": True}
    shots_needed = c.post("/v1/estimate", json=sampled).raise_for_status().json()["shots"]
    if set_budget is not None:
        set_budget(shots_needed)
    else:
        left = c.get("/v1/budget").raise_for_status().json()["shots"]["remaining"]
        console.print(f"the shot-based job's forecast: {shots_needed:,} shots; your budget: {_shots(left)} left")

    jobs = []
    dashboard = f"{str(c.base_url).rstrip('/')}/dashboard/"
    for spec in (sampled, exact):
        job = c.post("/v1/jobs", json=spec).raise_for_status().json()
        shots = "exact, no shots" if spec.get("shots") is None else f"{spec['shots']} shots per circuit"
        console.print(
            f"\njob {job['id']}: {spec['name']} ({model}, {spec['max_steps']} steps, {shots}); "
            f"forecast {job['shots']['forecast'] or 0:,} shots; {dashboard}"
        )
        job = _follow(c, job, console)
        console.print(f"{job['state']}: {job['reason'] or ''} (Ray job qpeft-{job['id']}, for the operator)")
        if spec is sampled:
            spent, q = job["shots"]["spent"], job["shots"]
            console.print(
                f"shots spent {spent:,} (shot-adaptive) against {naive['shots']:,} forecast for plain parameter "
                f"shift at {spec['shots']} shots per circuit: {naive['shots'] / max(spent, 1):.1f}x fewer"
            )
            est = " (estimated: local mode reports no usage)" if q["qpu_seconds_estimated"] >= q["qpu_seconds"] else ""
            console.print(
                f"QPU time {q['qpu_seconds']:.1f} s{est}, ${q['cost_usd']:.2f} at ${_price(naive):.2f}/s; plain "
                f"parameter shift's forecast: {naive['qpu_seconds']:.1f} s, ${naive['cost_usd']:.2f} "
                f"({naive['jobs']} jobs of ~{naive['seconds_per_job']:.0f} s fixed time each dominate at this size)"
            )
            summary["frugal"] = {
                "spent": spent,
                "naive_forecast": naive["shots"],
                "qpu_seconds": q["qpu_seconds"],
                "cost_usd": q["cost_usd"],
                "naive_qpu_seconds": naive["qpu_seconds"],
            }
        _report(c, job, console, summary)
        jobs.append(job)
    b = c.get("/v1/budget").raise_for_status().json()["shots"]
    console.print(f"\nshots spent {b['spent']:,} of a budget of {_shots(b['limit'])} ({_shots(b['remaining'])} left)")
    summary.update(jobs=[(j["id"], j["state"], j["step"], j["shots"]["spent"]) for j in jobs], budget=b)

    last = jobs[-1]
    if last["state"] != "SUCCEEDED":
        raise RuntimeError(f"job {last['id']} ended {last['state']}: {last['reason']}")
    archive = work / "lora.zip"
    archive.write_bytes(c.get(f"/v1/jobs/{last['id']}/artifacts/lora").raise_for_status().content)
    lora_dir = work / "lora"
    zipfile.ZipFile(archive).extractall(lora_dir)
    console.print(f"downloaded the LoRA artifact of {last['id']} to {lora_dir}")

    # Inference with plain transformers + peft, on a fresh base model: no service, no quantum software.
    transformers.utils.logging.disable_progress_bar()
    fresh, tok = load_model(model, device=device)
    plain = load_peft_lora(fresh, lora_dir).eval()
    prompt = tok("The history of the city", return_tensors="pt").to(device)
    with torch.no_grad():
        ids = plain.generate(**prompt, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    summary["sample"] = tok.decode(ids[0], skip_special_tokens=True)
    console.print(f"generated with transformers + peft from the job's LoRA: {summary['sample']!r}")
    return summary


def _price(estimate: dict) -> float:
    """The server's price per QPU second, as its estimate applied it."""
    return estimate["cost_usd"] / estimate["qpu_seconds"] if estimate.get("qpu_seconds") else 0.0


def _shots(n) -> str:
    return "unlimited" if n is None else f"{n:,}"


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process, from `ps`."""
    ps = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    rows = (line.split(None, 2) for line in ps.splitlines() if line.strip())
    return {int(r[0]): (int(r[1]), r[2] if len(r) > 2 else "") for r in rows}


def _tree(root: int) -> dict[int, str]:
    """The process `root` and all its descendants (Ray's workers run in their own sessions, so the head's
    process group alone would miss them)."""
    procs, found = _processes(), {}
    todo = [root] if root in procs else []
    while todo:
        pid = todo.pop()
        found[pid] = procs[pid][1]
        todo += [p for p, (ppid, _) in procs.items() if ppid == pid]
    return found


def _still_running(tree: dict[int, str]) -> dict[int, str]:
    procs = _processes()
    return {pid: args for pid, args in tree.items() if pid in procs and procs[pid][1] == args}


def run_service_demo(model: str, data_dir, device: str = "cpu", steps: int = 10, quick: bool = False) -> dict:
    """Run the two jobs and return a summary (job states, shots, the generated sample, leftover processes)."""
    import httpx
    import uvicorn
    from rich.console import Console

    from services.contract.engine import dispose
    from services.control_plane.app import create_app
    from services.control_plane.ray_jobs import stop_local_head
    from services.control_plane.settings import Settings

    console = Console()
    # The API validates dataset names against this folder, and the trainer (a Ray job) reads it too.
    os.environ["QPEFT_SHARED_DATA"] = str(Path(data_dir).resolve())
    work = Path(tempfile.mkdtemp(prefix="qpeft-service-demo-"))
    admin = secrets.token_urlsafe(24)
    settings = Settings(
        data_dir=work / "data",
        admin_key=admin,
        poll_s=0.5,
        trainer_command="{python} -m services.trainer",
        job_env={"QPEFT_SHARED_DATA": os.environ["QPEFT_SHARED_DATA"]},
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    summary: dict = {"dashboard": f"{url}/dashboard/"}
    ray_state = settings.data_dir / "ray.json"
    head: dict = {}
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the control plane did not start")
            time.sleep(0.1)
        console.print(f"control plane (embedded: SQLite, local Ray head) at {url}; dashboard: {url}/dashboard/")
        with httpx.Client(base_url=url, timeout=60) as c:
            # The reconciler starts the Ray head in the background; /readyz answers 200 once it is up.
            deadline = time.time() + 300
            while c.get("/readyz").status_code != 200:
                if time.time() > deadline:
                    raise RuntimeError(f"the local Ray head did not come up; see {settings.data_dir / 'ray-head.log'}")
                time.sleep(1)
            head = json.loads(ray_state.read_text())
            console.print(f"local Ray head: GCS {head['gcs_address']}, Ray dashboard {head['dashboard_url']}")

            tenant = c.post("/v1/tenants", json={"name": "demo", "shots": None}, headers={"X-API-Key": admin})
            c.headers.update({"X-API-Key": tenant.raise_for_status().json()["api_key"]})

            def set_budget(needed: int) -> None:  # twice the shot job's forecast: enough for it, small enough to matter
                budget = {"shots": 2 * needed}
                c.put("/v1/tenants/demo/budget", json=budget, headers={"X-API-Key": admin}).raise_for_status()
                console.print(
                    f"tenant 'demo' with a budget of {2 * needed:,} shots (the shot-based job's forecast: {needed:,})"
                )

            # The training text as a user has it: a TSV on their machine with a `text` column, one row per
            # paragraph (WikiText-2's validation split stands in for the user's own corpus).
            corpus = work / "my-corpus.tsv"
            lines = (Path(data_dir) / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").splitlines()
            rows = (line.replace("\t", " ") for line in lines if line.strip())
            corpus.write_text("text\n" + "".join(f"{row}\n" for row in rows), encoding="utf-8")
            summary.update(run_jobs(c, console, model, corpus, work, device, steps, quick, set_budget))
    finally:
        server.should_exit = True  # the lifespan stops the reconciler
        thread.join(timeout=30)
        if not head and ray_state.exists():  # the head was starting when something failed
            head = json.loads(ray_state.read_text())
        tree = _tree(head["pgid"]) if head.get("pgid") else {}
        stop_local_head(settings.data_dir)
        dispose(settings.db_url)
        for _ in range(40):  # Ray's workers exit a moment after the head
            if not _still_running(tree):
                break
            time.sleep(0.5)
        for pid in _still_running(tree):  # ours, started for this demo: end them by id
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        left = _still_running(tree)
        summary["left_processes"] = left
        console.print(
            f"stopped the API server and the local Ray head ({len(tree)} processes); "
            + ("none left running" if not left else f"[red]still running:[/red] {left}")
        )
    return summary


def main(argv=None):
    from qpeft_core import demo as library

    parser = library.build_parser()
    parser.add_argument("--skip-service", action="store_true", help="leave out the jobs through the service")
    args = parser.parse_args(argv)
    rows, r = library.run(args)
    if not args.skip_service:
        print(f"\n== {args.model}: the QPA fine-tune as jobs through the embedded service ==")
        data = args.data or library.default_data_dir()
        r["service"] = run_service_demo(args.model, data, args.device, r["steps"], args.quick)
    return rows, r


if __name__ == "__main__":
    main()
