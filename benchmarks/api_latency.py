"""The control plane under load: GET /v1/jobs/{id} latency at a fixed request rate, and the time from
submitting a job to its first optimizer step, on the embedded service (`qpeft serve`: SQLite, a local Ray
head) over loopback.

The server is `python -m services.cli serve` in its own process, as a user runs it; this process is the
client. Load is open-loop: request i is due at start + i / rps whatever happened to earlier ones, and its
latency counts from that due time, so a server that stalls shows up in the tail instead of slowing the
client down (the coordinated-omission trap of closed-loop tools such as wrk). That schedule is the reason
for a small asyncio client here rather than wrk, which only runs closed-loop.

Phases:
1. submit-to-first-step: a tiny QPA job (exact executor) on the fresh Ray head (cold: the first job starts
   Ray's job driver and workers), then the same again (warm). Measured from the POST's answer to the first
   GET that shows step >= 1, polled every 50 ms.
2. the load at --rps for --seconds against the finished job (the headline), then
3. the same load while another job trains on the same 2 cores (reported beside it).

Usage: .venv/bin/python benchmarks/api_latency.py [--rps 200] [--seconds 20] [--append-results]
Last line: api_latency p99_ms=.. rps=.. submit_to_first_step_s=..
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from services.control_plane.models import FINAL_STATES
from services.control_plane.ray_jobs import free_port

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"


def job_spec(name: str, steps: int) -> dict:
    return {
        "name": name,
        "base_model": "tiny-gpt2",
        "dataset": {"train": "wikitext-2", "max_length": 32, "limit": 64},
        "method": "qpa",
        "method_config": {"r": 4, "n_mlp": 64},  # tiny-gpt2 generates 2,048 numbers: 2048 per state leaves no MLP
        "executor": "exact",
        "max_steps": steps,
        "training": {"batch_size": 4, "lr": 1e-2, "eval_max_batches": 1},
    }


def wait_ready(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the control plane at {url} was not ready after {timeout:.0f} s")


def submit_to_first_step(api: httpx.Client, name: str, steps: int) -> tuple[str, float]:
    job = api.post("/v1/jobs", json=job_spec(name, steps)).raise_for_status().json()
    t0 = time.perf_counter()
    while True:
        j = api.get(f"/v1/jobs/{job['id']}").raise_for_status().json()
        if j["step"] >= 1:
            return job["id"], time.perf_counter() - t0
        if j["state"] in FINAL_STATES:
            raise RuntimeError(f"job {job['id']} ended {j['state']} before its first step: {j['reason']}")
        time.sleep(0.05)


def wait_final(api: httpx.Client, job_id: str, timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        j = api.get(f"/v1/jobs/{job_id}").raise_for_status().json()
        if j["state"] in FINAL_STATES:
            return j
        time.sleep(0.5)
    raise RuntimeError(f"job {job_id} did not finish in {timeout:.0f} s")


async def load(url: str, path: str, headers: dict, rps: float, seconds: float, connections: int = 32) -> dict:
    """Open-loop GETs of `path` at `rps` for `seconds` over `connections` keep-alive connections; latencies in
    ms from each request's due time.

    A minimal HTTP/1.1 client on asyncio streams, not httpx: httpx's async pool costs milliseconds of CPU
    per request and, once requests queue, more per queued request, so at 200 requests/s on 2 cores the
    client (not the server) set the latency. wrk is closed-loop only (see the module docstring).
    """
    host, port = url.removeprefix("http://").split(":")
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{head}\r\n".encode()
    n = int(rps * seconds)
    due_times: asyncio.Queue = asyncio.Queue()
    latencies: list[float] = []
    errors: dict[str, int] = {}

    async def connection() -> None:
        reader = writer = None
        while True:
            due = await due_times.get()
            if due is None:
                break
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(request)
                status = int((await reader.readline()).split()[1])
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                await reader.readexactly(length)
                key = None if status == 200 else f"HTTP {status}"
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as e:
                key, writer = type(e).__name__, None
            if key is None:
                latencies.append(1e3 * (time.perf_counter() - due))
            else:
                errors[key] = errors.get(key, 0) + 1
        if writer is not None:
            writer.close()

    workers = [asyncio.create_task(connection()) for _ in range(connections)]
    start = time.perf_counter() + 0.2
    for i in range(n):
        due = start + i / rps
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        due_times.put_nowait(due)
    for _ in workers:
        due_times.put_nowait(None)
    await asyncio.gather(*workers)
    elapsed = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else [float("nan")] * 99
    return {
        "requests": n,
        "ok": len(latencies),
        "errors": errors,
        "connections": connections,
        "achieved_rps": len(latencies) / elapsed,
        "p50_ms": q[49],
        "p90_ms": q[89],
        "p99_ms": q[98],
        "max_ms": max(latencies, default=float("nan")),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rps", type=float, default=200.0, help="requests per second (default: %(default)s)")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each load phase (default: %(default)s)")
    ap.add_argument("--busy-steps", type=int, default=200, help="steps of the job that trains during phase 3")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder (default: %(default)s)")
    ap.add_argument("--append-results", action="store_true", help="append a section to benchmarks/RESULTS.md")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="qpeft-api-latency-"))
    admin, port = secrets.token_urlsafe(24), free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "QPEFT_RAY_ADDRESS", "QPEFT_DATABASE_URL")}
    env |= {"QPEFT_DATA_DIR": str(work / "data"), "QPEFT_ADMIN_KEY": admin, "RAY_AUTH_MODE": "disabled"}
    env |= {"QPEFT_SHARED_DATA": str(args.data.resolve()), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "services.cli", "serve", "--port", str(port)]
    with open(work / "server.log", "wb") as out:
        server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=out, start_new_session=True)
    result: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu_count": os.cpu_count()}
    try:
        wait_ready(url, 300)
        with httpx.Client(base_url=url, timeout=60) as api:
            made = api.post("/v1/tenants", json={"name": "bench", "shots": None}, headers={"X-API-Key": admin})
            key = {"X-API-Key": made.raise_for_status().json()["api_key"]}
            api.headers.update(key)

            cold_id, cold = submit_to_first_step(api, "cold", 2)
            wait_final(api, cold_id)
            warm_id, warm = submit_to_first_step(api, "warm", 2)
            wait_final(api, warm_id)
            print(f"submit to first step: {cold:.2f} s (first job on a fresh head), {warm:.2f} s (second job)")
            result["submit_to_first_step_s"] = {"cold": cold, "warm": warm}

            idle = asyncio.run(load(url, f"/v1/jobs/{cold_id}", key, args.rps, args.seconds))
            print(f"GET /v1/jobs/{{id}}, idle service: {json.dumps(idle)}")
            busy_id, _ = submit_to_first_step(api, "busy", args.busy_steps)
            busy = asyncio.run(load(url, f"/v1/jobs/{busy_id}", key, args.rps, args.seconds))
            busy["job_step_at_end"] = api.get(f"/v1/jobs/{busy_id}").json()["step"]
            print(f"GET /v1/jobs/{{id}}, while a job trains: {json.dumps(busy)}")
            api.post(f"/v1/jobs/{busy_id}/cancel")
            result |= {"idle": idle, "busy": busy, "rps": args.rps, "seconds": args.seconds}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        # the embedded head outlives the server by design (jobs survive restarts): stop it as `qpeft stop-ray`
        subprocess.run([sys.executable, "-m", "services.cli", "stop-ray"], cwd=ROOT, env=env, capture_output=True)

    out = ROOT / "benchmarks" / "results" / "api_latency.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    idle, busy, s2fs = result["idle"], result["busy"], result["submit_to_first_step_s"]
    summary = (
        f"api_latency p99_ms={idle['p99_ms']:.2f} rps={idle['achieved_rps']:.1f} "
        f"submit_to_first_step_s={s2fs['cold']:.2f} p99_busy_ms={busy['p99_ms']:.2f} "
        f"submit_to_first_step_warm_s={s2fs['warm']:.2f}"
    )
    if args.append_results:

        def row(name, r):
            errors = sum(r["errors"].values())
            return (
                f"| {name} | {r['achieved_rps']:.1f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
                f"**{r['p99_ms']:.2f}** | {r['max_ms']:.1f} | {errors} |"
            )

        load_avg = " / ".join(f"{x:.2f}" for x in os.getloadavg())
        section = f"""
## api_latency

`.venv/bin/python benchmarks/api_latency.py {" ".join(sys.argv[1:])}` ({datetime.date.today()}, \
{os.cpu_count()} CPUs, load average after the run {load_avg}; server `qpeft serve` embedded: SQLite, local Ray \
head, uvicorn with its access log; client: asyncio streams, 32 keep-alive connections, in another process on loopback)

GET /v1/jobs/{{id}} at {args.rps:.0f} requests/s for {args.seconds:.0f} s, open-loop (latency from each \
request's due time). Goal: p99 < 50 ms.

| phase | achieved rps | p50 ms | p90 ms | p99 ms | max ms | errors |
|---|---|---|---|---|---|---|
{row("idle service (headline)", idle)}
{row(f"while a tiny QPA job trains (reached step {busy['job_step_at_end']})", busy)}

Submit to first step (POST answered -> GET shows step >= 1; tiny-gpt2 QPA, exact executor): \
{s2fs["cold"]:.2f} s for the first job on a fresh Ray head, {s2fs["warm"]:.2f} s for the next one. \
Most of it is the trainer's start: a Ray job driver, Ray Train's worker group, the quantum pool's actor, \
imports of torch, transformers and qiskit; the reconciler's pass (every 1 s) adds up to a second.

`{summary}`
"""
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(section)
    print(summary)


if __name__ == "__main__":
    main()
