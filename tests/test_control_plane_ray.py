"""The control plane with a real Ray cluster (the session's, with its job server): jobs run through the Ray
Jobs API, events come back from the Ray job log, shots go through the SQL ledger, cancellation and
budget exhaustion end jobs cleanly, a restarted control plane picks up a job that finished while it was
down, and the CLI drives it all over HTTP.

The job entrypoint is tests/control_plane_standin_trainer.py, a STAND-IN that follows the trainer's
contract; the lead switches the end-to-end test to `python -m services.trainer` once that exists."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from services.control_plane.app import create_app
from tests.test_control_plane_support import (  # noqa: F401  (fixtures)
    ADMIN,
    SPEC,
    LiveServer,
    db_url,
    make_settings,
    new_tenant,
    pg_admin,
    sqlite_url,
    wait_for,
)

STANDIN_SPEC = {**SPEC, "max_steps": 6}  # 100 shots x 3 circuits per step in the stand-in


@pytest.fixture(scope="session")
def ray_jobs_url(ray_cluster):
    """The job server (dashboard) of the session's Ray cluster (conftest's `ray_cluster`)."""
    return ray_cluster.dashboard_url


def ray_app(tmp_path, url, ray_url, step_s=0.2, **job_env):
    settings = make_settings(
        tmp_path / "data",
        url,
        ray_address=ray_url,
        poll_s=0.3,
        job_env={"QPEFT_STANDIN_STEP_S": str(step_s), **job_env},
    )
    return create_app(settings)


REAL_SPEC = {**SPEC, "shots": 64, "dataset": {"train": "tinyshakespeare", "limit": 200, "max_length": 32}}


def real_trainer_settings(tmp_path, url, ray_url):
    return make_settings(
        tmp_path / "data", url, ray_address=ray_url, poll_s=0.5, trainer_command="{python} -m services.trainer"
    )


def kill_driver(tmp_path, job_id: str) -> None:
    """SIGKILL the job's driver: the Ray job entrypoint, the one process whose command line names its spec."""
    import psutil

    spec = str(tmp_path / "data" / "jobs" / job_id / "spec.json")
    drivers = [p for p in psutil.process_iter(["cmdline"]) if spec in (p.info["cmdline"] or [])]
    assert len(drivers) == 1, drivers
    drivers[0].kill()


def final(client, key, job_id, timeout=90):
    def done():
        j = client.get(f"/v1/jobs/{job_id}", headers=key).json()
        return j if j["state"] not in ("QUEUED", "RUNNING") else None

    return wait_for(done, timeout=timeout, what=f"job {job_id} to finish")


def test_job_runs_on_ray(tmp_path, db_url, ray_jobs_url):  # noqa: F811
    with TestClient(ray_app(tmp_path, db_url, ray_jobs_url)) as c:
        key = new_tenant(c, "acme", shots=100_000)
        job = c.post("/v1/jobs", json=STANDIN_SPEC, headers=key).json()
        with c.stream("GET", f"/v1/jobs/{job['id']}/events", headers=key) as s:
            events = [line[7:] for line in s.iter_lines() if line.startswith("event: ")]
        assert events[-1] == "end" and events.count("progress") == 6
        j = c.get(f"/v1/jobs/{job['id']}", headers=key).json()
        assert (j["state"], j["reason"], j["step"]) == ("SUCCEEDED", "max_steps reached", 6)
        # the shots the trainer committed in the SQL ledger, on the job's account and the tenant's
        assert j["shots"]["spent"] == 6 * 300 and j["shots"]["reserved"] == 0
        assert c.get("/v1/budget", headers=key).json()["shots"]["remaining"] == 100_000 - 1800
        points = c.get(f"/v1/jobs/{job['id']}/metrics", headers=key).json()["points"]
        assert [p["step"] for p in points] == [1, 2, 3, 4, 5, 6] and points[-1]["shots_spent"] == 1800
        assert points[0]["loss"] > points[-1]["loss"]
        lines = [x["line"] for x in c.get(f"/v1/jobs/{job['id']}/logs?tail=1000", headers=key).json()["lines"]]
        assert any("stand-in trainer for job" in x for x in lines) and "step 6: loss 1.5943" in lines
        names = {a["name"] for a in c.get(f"/v1/jobs/{job['id']}/artifacts", headers=key).json()}
        assert names == {"adapter", "metrics.jsonl"}
        assert c.get(f"/v1/jobs/{job['id']}/artifacts/adapter", headers=key).content[:2] == b"PK"
        assert c.get("/readyz").status_code == 200
        # the Ray dashboard (no login, takes job submissions) is for operators: the admin key gets its URL
        assert "ray" not in j["links"] and c.get("/v1/info", headers=key).json()["ray_dashboard_url"] is None
        assert c.get("/v1/info", headers={"X-API-Key": ADMIN}).json()["ray_dashboard_url"].startswith(ray_jobs_url)


def test_jobs_must_fit_the_ray_cluster(tmp_path, sqlite_url, ray_jobs_url):  # noqa: F811
    """The session's head has 2 CPUs and no GPU: the control plane reads that from Ray's state API."""
    with TestClient(ray_app(tmp_path, sqlite_url, ray_jobs_url)) as c:
        key = new_tenant(c, "acme")
        wait_for(lambda: c.app.state.reconciler.ray is not None, timeout=30, what="the reconciler's Ray client")
        assert c.app.state.capacity.get() is None or c.app.state.capacity.get()["CPU"] == 2
        wait_for(lambda: c.app.state.capacity.get() is not None, timeout=30, what="the head's CPUs in Ray's state API")
        gpu = c.post("/v1/jobs", json={**SPEC, "scaling": {"num_workers": 256, "use_gpu": True}}, headers=key)
        assert gpu.status_code == 422, gpu.text
        err = gpu.json()["errors"][0]
        assert err["field"] == "body.scaling.use_gpu" and "0 GPUs" in err["message"] and "use_gpu" in err["fix"]
        cpu = c.post("/v1/estimate", json={**SPEC, "scaling": {"num_workers": 3}}, headers=key)
        assert cpu.status_code == 422, cpu.text
        err = cpu.json()["errors"][0]
        assert err["field"] == "body.scaling.num_workers" and "2 CPU(s)" in err["message"] and "at most 2" in err["fix"]
        assert c.post("/v1/estimate", json={**SPEC, "scaling": {"num_workers": 2}}, headers=key).status_code == 200


def test_budget_exhaustion_and_cancel(tmp_path, sqlite_url, ray_jobs_url):  # noqa: F811
    with TestClient(ray_app(tmp_path, sqlite_url, ray_jobs_url, step_s=0.3)) as c:
        key = new_tenant(c, "acme", shots=10**7)
        until = {**STANDIN_SPEC, "shot_limit": 700, "run_until_budget_ends": True}
        broke = c.post("/v1/jobs", json=until, headers=key).json()["id"]
        long = c.post("/v1/jobs", json={**STANDIN_SPEC, "max_steps": 500}, headers=key).json()["id"]
        wait_for(lambda: c.get(f"/v1/jobs/{long}", headers=key).json()["step"] >= 1, what="the long job to start")
        assert c.post(f"/v1/jobs/{long}/cancel", headers=key).status_code == 202
        b, l_ = final(c, key, broke), final(c, key, long)
        assert b["state"] == "BUDGET_EXHAUSTED" and "exhausted" in b["reason"]
        assert (b["step"], b["shots"]["spent"], b["shots"]["limit"]) == (2, 600, 700)  # a 3rd step needs 900
        assert l_["state"] == "CANCELLED" and l_["step"] < 500
        assert c.get("/v1/budget", headers=key).json()["shots"]["reserved"] == 0


def test_restart_picks_up_a_job_that_finished_meanwhile(tmp_path, sqlite_url, ray_jobs_url):  # noqa: F811
    from ray.job_submission import JobSubmissionClient

    app = ray_app(tmp_path, sqlite_url, ray_jobs_url, step_s=0.4)
    with TestClient(app) as c:
        key = new_tenant(c, "acme")
        job_id = c.post("/v1/jobs", json={**STANDIN_SPEC, "max_steps": 5}, headers=key).json()["id"]
        wait_for(lambda: c.get(f"/v1/jobs/{job_id}", headers=key).json()["step"] >= 1, what="the job to start")
    # the control plane is down; the job goes on in Ray and finishes
    ray = JobSubmissionClient(ray_jobs_url)
    wait_for(lambda: ray.get_job_status(f"qpeft-{job_id}").value == "SUCCEEDED", timeout=60, what="Ray")
    with TestClient(ray_app(tmp_path, sqlite_url, ray_jobs_url)) as c:
        j = final(c, key, job_id, timeout=30)
        assert (j["state"], j["step"]) == ("SUCCEEDED", 5)
        steps = [p["step"] for p in c.get(f"/v1/jobs/{job_id}/metrics", headers=key).json()["points"]]
        assert steps == [1, 2, 3, 4, 5]  # nothing lost, nothing stored twice


def test_a_job_outlives_its_driver(tmp_path, sqlite_url, ray_jobs_url):  # noqa: F811
    """SIGKILL the job's driver (the Ray job entrypoint) in the middle of a step: the control plane submits the
    job again, the trainer resumes from its checkpoint, and the killed step's shots are charged as lost once."""
    # attempt 1 checkpoints steps 1 and 2, then holds step 3's shots in a pool call that never returns
    with TestClient(ray_app(tmp_path, sqlite_url, ray_jobs_url, QPEFT_STANDIN_HANG_AT="3")) as c:
        key = new_tenant(c, "acme", shots=100_000)
        job_id = c.post("/v1/jobs", json={**STANDIN_SPEC, "max_steps": 5}, headers=key).json()["id"]

        def hanging():
            j = c.get(f"/v1/jobs/{job_id}", headers=key).json()
            return j["step"] == 2 and j["shots"]["reserved"] == 300

        wait_for(hanging, timeout=60, what="step 3's pool call")
        kill_driver(tmp_path, job_id)
        j = final(c, key, job_id)
        assert (j["state"], j["attempt"], j["step"]) == ("SUCCEEDED", 2, 5), j["reason"]
        # five steps paid once each, plus the killed call as lost; nothing held, nothing charged twice
        assert j["shots"] == {**j["shots"], "spent": 5 * 300, "lost": 300, "reserved": 0}
        assert c.get("/v1/budget", headers=key).json()["shots"]["remaining"] == 100_000 - 6 * 300
        points = c.get(f"/v1/jobs/{job_id}/metrics", headers=key).json()["points"]
        assert [p["step"] for p in points] == [1, 2, 3, 4, 5]  # attempt 2 went on from step 2, not from 0
        lines = [x["line"] for x in c.get(f"/v1/jobs/{job_id}/logs?tail=1000", headers=key).json()["lines"]]
        note = next(i for i, x in enumerate(lines) if "attempt 1 of 3 ended when its driver died" in x)
        assert "resubmitting as attempt 2" in lines[note]
        assert lines.index("resumed from the checkpoint of step 2") > note
        assert sum("stand-in trainer for job" in x for x in lines) == 2  # one line from each attempt's start
        with c.stream("GET", f"/v1/jobs/{job_id}/events", headers=key) as s:
            data = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert any("attempt 1 of 3 ended" in x for x in data)


def test_cli(tmp_path, sqlite_url, ray_jobs_url):  # noqa: F811
    import httpx
    from typer.testing import CliRunner

    from services.cli import app as cli

    with LiveServer(ray_app(tmp_path, sqlite_url, ray_jobs_url)) as server, httpx.Client(base_url=server.url) as c:
        key = new_tenant(c, "acme", shots=50_000)
        env = {"QPEFT_URL": server.url, "QPEFT_API_KEY": key["X-API-Key"], "COLUMNS": "160"}
        run = CliRunner().invoke
        spec = tmp_path / "spec.yaml"
        spec.write_text(
            "base_model: tiny-gpt2\ndataset: tinyshakespeare\nmethod: qpa\n"
            "method_config: {r: 2, n_mlp: 64, qnn_depth: 2}\nexecutor: aer\nshots: 100\nmax_steps: 4\n"
        )
        r = run(cli, ["estimate", str(spec)], env=env)
        assert r.exit_code == 0 and "6,800 shots" in r.output and "fits" in r.output, r.output
        r = run(cli, ["submit", str(spec), "--follow"], env=env)
        assert r.exit_code == 0, r.output
        assert "SUCCEEDED" in r.output and "4/4" in r.output, r.output
        job_id = r.output.split()[1]
        r = run(cli, ["jobs"], env=env)
        assert job_id in r.output and "SUCCEEDED" in r.output
        r = run(cli, ["logs", job_id, "-f"], env=env)
        assert "step 4: loss" in r.output
        r = run(cli, ["budget"], env=env)
        assert "50000" in r.output and "1200" in r.output, r.output
        r = run(cli, ["cancel", job_id], env=env)
        assert r.exit_code == 1 and "already finished" in r.output
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({**SPEC, "method_config": {"r": -1}}))
        r = run(cli, ["submit", str(bad)], env=env)
        assert r.exit_code == 1 and "method_config.r" in r.output


@pytest.mark.slow
def test_real_trainer_end_to_end(tmp_path, sqlite_url, ray_jobs_url):  # noqa: F811
    """The same path with the real trainer (`python -m services.trainer`): Ray Train, the quantum pool on
    the "qpu" resource, shots through the SQL ledger, adapter and LoRA export as artifacts."""
    settings = real_trainer_settings(tmp_path, sqlite_url, ray_jobs_url)
    spec = {**REAL_SPEC, "max_steps": 3}
    with TestClient(create_app(settings)) as c:
        key = new_tenant(c, "acme", shots=100_000)
        job = c.post("/v1/jobs", json=spec, headers=key).json()
        j = final(c, key, job["id"], timeout=300)
        assert j["state"] == "SUCCEEDED", j["reason"]
        assert j["step"] == 3 and j["shots"]["spent"] == job["shots"]["forecast"] == 3 * 17 * 64
        assert j["shots"]["reserved"] == 0
        names = {a["name"] for a in c.get(f"/v1/jobs/{job['id']}/artifacts", headers=key).json()}
        assert {"adapter", "lora"} <= names
        points = c.get(f"/v1/jobs/{job['id']}/metrics", headers=key).json()["points"]
        assert [p["step"] for p in points] == [1, 2, 3]


def test_real_trainer_runs_shot_frugal_jobs_as_forecast(tmp_path, sqlite_url, ray_jobs_url):  # noqa: F811
    """The shot-frugal options through the API and the quantum pool: SPSA (2 perturbations), the angles updated
    every 2 steps, the first step on the exact simulator. Its shots are exactly the forecast: 2 updates of 4
    circuits and 2 forwards on the executor (the warm start's measurement is reused until the first update),
    at 64 shots; 8.5x fewer than plain parameter shift would spend."""
    settings = real_trainer_settings(tmp_path, sqlite_url, ray_jobs_url)
    qpa = {**REAL_SPEC["method_config"], "quantum_update_every": 2, "warm_start_steps": 1}
    spec = {**REAL_SPEC, "max_steps": 5, "gradient": "spsa", "gradient_options": {"samples": 2}, "method_config": qpa}
    with TestClient(create_app(settings)) as c:
        key = new_tenant(c, "acme", shots=100_000)
        naive = c.post("/v1/estimate", json={**REAL_SPEC, "max_steps": 5}, headers=key).json()
        job = c.post("/v1/jobs", json=spec, headers=key).json()
        assert job["shots"]["forecast"] == (2 + 2 * 4) * 64
        j = final(c, key, job["id"], timeout=300)
        assert j["state"] == "SUCCEEDED", j["reason"]
        assert j["shots"]["spent"] == job["shots"]["forecast"] < naive["shots"] / 8  # 640 against 5,440


def test_real_trainer_on_an_upload_hides_its_cells(tmp_path, sqlite_url, ray_jobs_url):  # noqa: F811
    """The issue's reproducer: an uploaded CSV whose label column holds text. The real trainer fails the job,
    and neither its reason nor its log holds the cell's text; the same upload with integer labels trains."""
    settings = real_trainer_settings(tmp_path, sqlite_url, ray_jobs_url)
    secret = "marmalade-5521"
    good = "text,label\n" + "".join(f"review {i} is {'good' if i % 2 else 'bad'},{i % 2}\n" for i in range(16))
    bad = "text,label\n" + "".join(f"review {i},{secret if i == 3 else i % 2}\n" for i in range(16))
    spec = {
        "base_model": "tiny-bert",
        "task": "seq_cls",
        "method": "lora",
        "method_config": {"r": 2},
        "max_steps": 2,
        "training": {"batch_size": 4, "eval_max_batches": 1},
    }
    with TestClient(create_app(settings)) as c:
        key = new_tenant(c, "acme")
        ids = {}
        for name, body in (("good.csv", good), ("bad.csv", bad)):
            r = c.post("/v1/datasets", params={"name": name}, content=body.encode(), headers=key)
            assert r.status_code == 201 and secret not in r.text, r.text
            ids[name] = r.json()["id"]

        def run(name):  # one after the other: two trainers at once crowd the session's 2-CPU cluster
            job = c.post("/v1/jobs", json={**spec, "dataset": {"train": ids[name], "limit": 16}}, headers=key).json()
            return job["id"], final(c, key, job["id"], timeout=300)

        bad_id, failed = run("bad.csv")
        assert failed["state"] == "FAILED"
        assert ids["bad.csv"] in failed["reason"] and "row 3" in failed["reason"] and "'label'" in failed["reason"]
        logs = c.get(f"/v1/jobs/{bad_id}/logs", params={"tail": 10000}, headers=key).json()["lines"]
        assert logs and secret not in failed["reason"] and all(secret not in line["line"] for line in logs)
        assert str(settings.data_dir) not in failed["reason"]  # nor where the server keeps it
        _, ok = run("good.csv")
        assert ok["state"] == "SUCCEEDED", ok["reason"]


@pytest.mark.slow
def test_real_trainer_resumes_after_its_driver_is_killed(tmp_path, sqlite_url, ray_jobs_url):  # noqa: F811
    """The real trainer, its driver SIGKILLed once step 3 is under way (so the checkpoint of step 2 is committed):
    attempt 2 is restored by Ray Train from its last checkpoint (same run name and storage) and finishes the job."""
    settings = real_trainer_settings(tmp_path, sqlite_url, ray_jobs_url)
    spec = {**REAL_SPEC, "max_steps": 5, "training": {"save_every": 1}}
    with TestClient(create_app(settings)) as c:
        key = new_tenant(c, "acme", shots=100_000)
        job_id = c.post("/v1/jobs", json=spec, headers=key).json()["id"]
        wait_for(lambda: c.get(f"/v1/jobs/{job_id}", headers=key).json()["step"] >= 3, timeout=300, what="step 3")
        kill_driver(tmp_path, job_id)
        j = final(c, key, job_id, timeout=400)
        assert (j["state"], j["attempt"], j["step"]) == ("SUCCEEDED", 2, 5), j["reason"]
        lines = [x["line"] for x in c.get(f"/v1/jobs/{job_id}/logs?tail=1000", headers=key).json()["lines"]]
        resumed = [int(x.rsplit(" ", 1)[1]) for x in lines if "resumed from the checkpoint of step" in x]
        assert resumed and min(resumed) >= 2, lines  # not from 0: from the checkpoint of step 2 or 3
        assert j["shots"]["reserved"] == 0
        assert j["shots"]["spent"] + j["shots"]["lost"] >= j["shots"]["forecast"]
