"""The REST API against a fake Ray job server (fast, deterministic): auth and tenant isolation, idempotent
submit, validation errors, forecast and budget refusal, the job lifecycle from the trainer's events,
cancellation, reconciliation after a restart, and the operations endpoints."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
from fastapi.testclient import TestClient

from services.control_plane.app import create_app
from services.control_plane.ray_jobs import job_database_url
from tests.test_control_plane_support import (  # noqa: F401  (fixtures)
    ADMIN,
    SPEC,
    FakeRay,
    db_url,
    make_settings,
    new_tenant,
    pg_admin,
    sqlite_url,
)


@pytest.fixture
def env(tmp_path, sqlite_url):  # noqa: F811
    yield from _env(tmp_path, sqlite_url)


@pytest.fixture
def env_any_db(tmp_path, db_url):  # noqa: F811
    yield from _env(tmp_path, db_url)


def _env(tmp_path, url):
    ray = FakeRay()
    app = create_app(make_settings(tmp_path / "data", url), ray=ray, reconcile=False)
    with TestClient(app) as client:
        yield app, client, ray


def ev(type, **fields):
    return {"type": type, **fields}


def submit(client, key, spec=None, **headers):
    return client.post("/v1/jobs", json=spec or SPEC, headers={**key, **headers})


# --- tenants, auth, isolation ------------------------------------------------------------------------
def test_tenants_see_only_their_own(env_any_db):
    app, c, _ = env_any_db
    a, b = new_tenant(c, "acme", shots=10**6), new_tenant(c, "beta")
    ids = [submit(c, a, {**SPEC, "name": f"job {i}"}).json()["id"] for i in range(3)]
    r = submit(c, a)
    assert r.status_code == 201 and r.json()["state"] == "QUEUED"
    other = submit(c, b).json()["id"]

    page = c.get("/v1/jobs?limit=2", headers=a).json()
    assert page["total"] == 4 and len(page["items"]) == 2 and page["next_offset"] == 2
    rest = c.get("/v1/jobs?limit=2&offset=2", headers=a).json()
    assert rest["next_offset"] is None
    assert {j["id"] for j in page["items"] + rest["items"]} == {*ids, r.json()["id"]}
    assert c.get("/v1/jobs?state=RUNNING", headers=a).json()["total"] == 0
    assert [j["id"] for j in c.get("/v1/jobs", headers=b).json()["items"]] == [other]

    # another tenant's job is not there at all: 404, never 403
    for path in ("", "/logs", "/metrics", "/artifacts", "/events", "/artifacts/adapter"):
        resp = c.get(f"/v1/jobs/{other}{path}", headers=a)
        assert resp.status_code == 404, path
        assert resp.json()["errors"][0]["field"] == "path.job_id"
    assert c.post(f"/v1/jobs/{other}/cancel", headers=a).status_code == 404

    budget = c.get("/v1/budget", headers=a).json()
    assert budget["tenant"] == "acme" and budget["shots"]["limit"] == 10**6
    assert c.get("/v1/budget", headers=b).json()["shots"]["limit"] is None

    assert c.get("/v1/jobs").status_code == 401
    bad = c.get("/v1/jobs", headers={"X-API-Key": "qpk_wrong"})
    assert bad.status_code == 401 and bad.json()["errors"][0]["field"] == "header.X-API-Key"
    assert c.get("/v1/jobs", headers={"Authorization": f"Bearer {a['X-API-Key']}"}).status_code == 200
    assert c.get("/v1/tenants", headers=a).status_code == 403  # tenants cannot manage tenants
    assert c.get("/v1/jobs", headers={"X-API-Key": ADMIN}).status_code == 403  # nor the admin act as one
    tenants = c.get("/v1/tenants", headers={"X-API-Key": ADMIN}).json()
    assert {t["name"] for t in tenants} == {"acme", "beta"}
    # keys are stored hashed: the database never holds one
    with app.state.sessions() as s:
        from services.control_plane.models import ApiKey

        hashes = [k.key_hash for k in s.query(ApiKey)]
    assert a["X-API-Key"] not in hashes and all(len(h) == 64 for h in hashes)


def test_key_rotation_and_budget_admin(env):
    _, c, _ = env
    A = {"X-API-Key": ADMIN}
    key = new_tenant(c, "acme", shots=100)
    info = c.get("/v1/tenants/acme", headers=A).json()
    second = c.post("/v1/tenants/acme/keys", headers=A).json()
    assert c.get("/v1/budget", headers={"X-API-Key": second["api_key"]}).status_code == 200
    assert c.delete(f"/v1/tenants/acme/keys/{info['keys'][0]['id']}", headers=A).status_code == 204
    assert c.get("/v1/budget", headers=key).status_code == 401
    r = c.put("/v1/tenants/acme/budget", json={"shots": 5000, "qpu_seconds": 12.5}, headers=A)
    assert r.json()["shots"]["remaining"] == 5000 and r.json()["qpu_seconds"]["limit"] == 12.5
    assert c.post("/v1/tenants", json={"name": "acme"}, headers=A).status_code == 409
    assert c.get("/v1/tenants/nobody", headers=A).status_code == 404
    bad = c.post("/v1/tenants", json={"name": "Bad Name!"}, headers=A)
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "body.name"


# --- submit: idempotency, validation, forecast --------------------------------------------------------
def test_idempotency_key(env):
    _, c, _ = env
    a = new_tenant(c, "acme")
    first = submit(c, a, **{"Idempotency-Key": "run-1"})
    again = submit(c, a, **{"Idempotency-Key": "run-1"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    clash = submit(c, a, {**SPEC, "max_steps": 6}, **{"Idempotency-Key": "run-1"})
    assert clash.status_code == 409
    assert clash.json()["errors"][0]["field"] == "header.Idempotency-Key"
    assert clash.json()["job_id"] == first.json()["id"]
    # keys are per tenant
    b = new_tenant(c, "beta")
    assert submit(c, b, **{"Idempotency-Key": "run-1"}).status_code == 201
    assert c.get("/v1/jobs", headers=a).json()["total"] == 1


@pytest.mark.parametrize(
    "change, field, words",
    [
        ({"method_config": {"r": 0}}, "body.method_config.r", "positive int"),
        ({"method_config": {"rank": 4}}, "body.method_config.rank", "unknown field"),
        ({"method_config": {"executor": "aer"}}, "body.method_config.executor", "top level"),
        ({"executor": "aer-noisy:FakeNowhere"}, "body.executor", "unknown fake device"),
        ({"executor": "quantum-annealer"}, "body.executor", "use one of"),
        ({"executor": "ibm:ibm_torino", "shots": None}, "body.shots", "set shots"),
        ({"gradient": "autograd"}, "body.gradient", "exact"),
        ({"method": "lora", "executor": "aer"}, "body.executor", "classically"),
        ({"dataset": "no-such-data"}, "body.dataset.train", "not found"),
        ({"base_model": "gpt-9"}, "body.base_model", "known model"),
        ({"max_steps": 0}, "body.max_steps", "greater than or equal"),
        ({"scaling": {"num_workers": 2, "gpus": 1}}, "body.scaling.gpus", "Extra inputs"),
        ({"executor_options": {"token": "x"}}, "body.executor_options", "credentials"),
        ({"shots": "many"}, "body.shots", "integer"),
        ({"method_config": {"r": 2, "n_mlp": 4096}}, "body.method_config.param_budget", "leaves no room"),
        ({"training": {"lr_scale": {"gate(": 10}}}, "body.training.lr_scale", "regular expression"),
        ({"training": {"lr_scale": {"gate": 0}}}, "body.training.lr_scale.gate", "greater than"),
    ],
)
def test_bad_spec_names_field_and_fix(env, change, field, words):
    _, c, _ = env
    a = new_tenant(c, "acme")
    r = submit(c, a, {**SPEC, **change})
    assert r.status_code == 422, r.text
    errs = r.json()["errors"]
    hit = [e for e in errs if e["field"] == field]
    assert hit, errs
    assert words in hit[0]["message"] and hit[0]["fix"]


def test_estimate_and_budget_refusal(env):
    _, c, _ = env
    a = new_tenant(c, "acme", shots=10_000)
    est = c.post("/v1/estimate", json=SPEC, headers=a).json()
    # tiny-gpt2 c_attn (64 -> 192) x 2 layers, r = 2: m = 1024, n_mlp 64: 16 states, N = 4, P = 8
    assert (est["qubits"], est["parameters"], est["gradient"]) == (4, 8, "parameter_shift")
    assert est["per_step"] == {
        "forward_circuits": 1,
        "gradient_circuits_per_call": 16,
        "gradient_calls": 1,
        "circuits": 17,
        "shots": 1700,
    }
    assert est["shots"] == 5 * 17 * 100 == 8500 and est["fits_budget"]
    assert "2P" in est["explanation"] and "8500" in est["formula"]

    spsa = c.post("/v1/estimate", json={**SPEC, "gradient": "spsa"}, headers=a).json()
    assert spsa["per_step"]["gradient_circuits_per_call"] == 2
    # the trainer takes one gradient call per step whatever grad_accum (dL/dp is accumulated, then one VJP)
    accum = {**SPEC, "training": {"grad_accum": 3}}
    assert c.post("/v1/estimate", json=accum, headers=a).json()["shots"] == 8500
    # shot-frugal schedules: an adaptive strategy's figure is an upper bound; an update every 5 steps measures
    # the angles at the start and after each update; warm-start steps run exactly, without shots
    adaptive = c.post("/v1/estimate", json={**SPEC, "gradient": "shot_adaptive"}, headers=a).json()
    assert (adaptive["shots"], adaptive["shots_bound"], est["shots_bound"]) == (8500, "upper", "exact")
    period = {**SPEC, "max_steps": 10, "method_config": {**SPEC["method_config"], "quantum_update_every": 5}}
    assert c.post("/v1/estimate", json=period, headers=a).json()["shots"] == (3 + 2 * 16) * 100
    warm = {**SPEC, "method_config": {**SPEC["method_config"], "warm_start_steps": 3}}
    assert c.post("/v1/estimate", json=warm, headers=a).json()["shots"] == (3 + 2 * 16) * 100
    exact = {**SPEC, "executor": "exact", "shots": None}
    assert c.post("/v1/estimate", json=exact, headers=a).json()["shots"] == 0
    lora = {**SPEC, "method": "lora", "executor": "exact", "shots": None, "method_config": {}}
    assert c.post("/v1/estimate", json=lora, headers=a).json()["shots"] == 0
    ibm = c.post("/v1/estimate", json={**SPEC, "executor": "fake-ibm:FakeManilaV2"}, headers=a).json()
    # QPU time: a job per executor call (5 forwards, 5 gradient calls) at its fixed cost, plus every shot's time
    assert ibm["jobs"] == 10 and ibm["seconds_per_job"] == 3.0 and ibm["qpu_seconds"] > 0
    want = ibm["jobs"] * ibm["seconds_per_job"] + ibm["seconds_per_shot"] * ibm["shots"]
    assert ibm["qpu_seconds"] == pytest.approx(want) and ibm["cost_usd"] == pytest.approx(1.6 * want)

    big = {**SPEC, "max_steps": 50}
    assert not c.post("/v1/estimate", json=big, headers=a).json()["fits_budget"]
    r = submit(c, a, big)
    assert r.status_code == 409
    body = r.json()
    assert body["forecast_shots"] == 50 * 17 * 100 and body["remaining_shots"] == 10_000
    assert body["errors"][0]["fix"]
    assert submit(c, a, {**big, "run_until_budget_ends": True}).status_code == 201
    # the job's own limit counts too
    assert submit(c, a, {**SPEC, "shot_limit": 1000}).status_code == 409
    job = submit(c, a, {**SPEC, "shot_limit": 9000}).json()
    assert job["shots"]["limit"] == 9000 and job["shots"]["forecast"] == 8500


# --- lifecycle ----------------------------------------------------------------------------------------
def test_job_lifecycle_from_trainer_events(env_any_db, monkeypatch):
    app, c, ray = env_any_db
    monkeypatch.setenv("QISKIT_IBM_TOKEN", "very-secret-token")
    app.state.reconciler.secrets.append("very-secret-token")
    a = new_tenant(c, "acme", shots=100_000)
    job = submit(c, a).json()
    jid, sid = job["id"], f"qpeft-{job['id']}"
    rec = app.state.reconciler
    rec.reconcile_once()  # submits to Ray
    sub = ray.jobs[sid]
    assert sub["entrypoint"].endswith(f"--spec {app.state.settings.job_dir(jid) / 'spec.json'}")
    assert sub["env"]["QPEFT_JOB_ID"] == jid and sub["env"]["QPEFT_TENANT"] == "acme"
    assert sub["env"]["QPEFT_LEDGER_KEY"] == f"job:{jid}"
    assert "very-secret-token" not in json.dumps(sub)  # IBM credentials never travel with a job
    assert sub["env"]["QPEFT_DATABASE_URL"] == job_database_url(app.state.settings.db_url)
    spec_file = json.loads((app.state.settings.job_dir(jid) / "spec.json").read_text())
    assert spec_file["method_config"]["target_modules"] == ["c_attn"]

    art = app.state.settings.job_dir(jid) / "artifacts"
    (art / "adapter").mkdir(parents=True)
    (art / "adapter" / "adapter_config.json").write_text("{}")
    (art / "lora.safetensors").write_bytes(b"weights")
    ray.emit(
        sid,
        "Runtime env is setting up.",
        ev("state", sub_state="WAITING_QPU"),
        ev("params", trainable=1234, total=98765),
        ev("progress", step=1, max_steps=5, loss=2.5, shots_spent=1700, tokens_per_s=900.0, pool_calls=2),
        "token in a traceback: very-secret-token",
        "half a li",
    )
    ray.jobs[sid]["log"] = ray.jobs[sid]["log"].rstrip("\n")  # the last line is still being written
    rec.reconcile_once()
    j = c.get(f"/v1/jobs/{jid}", headers=a).json()
    assert (j["state"], j["sub_state"], j["step"], j["loss"]) == ("RUNNING", "WAITING_QPU", 1, 2.5)
    assert j["parameters"] == {"trainable": 1234, "total": 98765}
    logs = c.get(f"/v1/jobs/{jid}/logs", headers=a).json()
    assert [x["line"] for x in logs["lines"]] == ["Runtime env is setting up.", "token in a traceback: ***"]

    ray.jobs[sid]["log"] += "ne\n"
    ray.emit(
        sid,
        ev("state", sub_state="TRAINING"),
        ev("progress", step=2, max_steps=5, loss=2.0, eval={"perplexity": 7.4}, shots_spent=3400),
        ev("log", message="saved checkpoint"),
        ev("artifact", name="adapter", path=str(art / "adapter")),
        ev("artifact", name="lora.safetensors", path=str(art / "lora.safetensors")),
        ev("artifact", name="passwd", path="/etc/passwd"),  # outside the job's folder: ignored
        ev("result", state="SUCCEEDED", reason="max_steps reached"),
        status="SUCCEEDED",
    )
    rec.reconcile_once()
    j = c.get(f"/v1/jobs/{jid}", headers=a).json()
    assert (j["state"], j["reason"], j["sub_state"], j["step"]) == ("SUCCEEDED", "max_steps reached", None, 2)
    lines = [x["line"] for x in c.get(f"/v1/jobs/{jid}/logs?tail=2", headers=a).json()["lines"]]
    assert lines == ["half a line", "saved checkpoint"]
    after = c.get(f"/v1/jobs/{jid}/logs?after=1", headers=a).json()
    assert after["lines"][0]["line"].endswith("***") and after["finished"]
    points = c.get(f"/v1/jobs/{jid}/metrics", headers=a).json()["points"]
    assert [(p["step"], p["loss"], p["shots_spent"]) for p in points] == [(1, 2.5, 1700), (2, 2.0, 3400)]
    assert points[1]["eval"] == {"perplexity": 7.4}

    arts = {x["name"]: x for x in c.get(f"/v1/jobs/{jid}/artifacts", headers=a).json()}
    assert set(arts) == {"adapter", "lora.safetensors"} and arts["adapter"]["kind"] == "directory"
    assert c.get(arts["lora.safetensors"]["url"], headers=a).content == b"weights"
    z = zipfile.ZipFile(io.BytesIO(c.get(arts["adapter"]["url"], headers=a).content))
    assert z.namelist() == ["adapter_config.json"]

    with c.stream("GET", f"/v1/jobs/{jid}/events", headers=a) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        text = "".join(s.iter_text())
    kinds = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
    assert kinds[0] == "job" and kinds.count("progress") == 2 and kinds[-1] == "end"
    with c.stream("GET", f"/v1/jobs/{jid}/logs?follow=true&tail=1", headers=a) as s:
        assert "".join(s.iter_text()) == "saved checkpoint\n"  # the job is over: the follow ends

    prom = c.get("/metrics", headers={"X-API-Key": ADMIN}).text  # tenant labels: operators only
    assert 'qpeft_jobs{state="SUCCEEDED",tenant="acme"} 1.0' in prom
    assert 'qpeft_pool_calls_total{tenant="acme"} 2.0' in prom and 'qpeft_shots_spent_total{tenant="acme"}' in prom
    assert 'qpeft_http_request_duration_seconds_count{method="GET",route="/v1/jobs/{job_id}"' in prom


def test_cancel(env):
    app, c, ray = env
    a = new_tenant(c, "acme")
    queued = submit(c, a).json()["id"]
    assert c.post(f"/v1/jobs/{queued}/cancel", headers=a).status_code == 202
    app.state.reconciler.reconcile_once()
    j = c.get(f"/v1/jobs/{queued}", headers=a).json()
    assert (j["state"], j["reason"]) == ("CANCELLED", "cancelled before it started")
    assert f"qpeft-{queued}" not in ray.jobs
    assert c.post(f"/v1/jobs/{queued}/cancel", headers=a).status_code == 409

    running = submit(c, a).json()["id"]
    app.state.reconciler.reconcile_once()
    ray.emit(f"qpeft-{running}", ev("state", sub_state="TRAINING"))
    app.state.reconciler.reconcile_once()
    c.post(f"/v1/jobs/{running}/cancel", headers=a)
    app.state.reconciler.reconcile_once()  # forwards stop_job; the fake stops at once
    app.state.reconciler.reconcile_once()
    j = c.get(f"/v1/jobs/{running}", headers=a).json()
    assert (j["state"], j["reason"]) == ("CANCELLED", "cancelled by the user")


def test_restart_reconciles_with_ray(tmp_path, sqlite_url):  # noqa: F811
    """Jobs live in the database: a new control plane on the same database picks them up, applies what
    happened in Ray while it was down, and marks jobs Ray lost as FAILED."""
    ray = FakeRay()
    settings = make_settings(tmp_path / "data", sqlite_url)
    with TestClient(create_app(settings, ray=ray, reconcile=False)) as c:
        a = new_tenant(c, "acme", shots=10**6)
        done, lost, crashed, broke, early = (submit(c, a, {**SPEC, "shot_limit": 10**5}).json()["id"] for _ in range(5))
        c.app.state.reconciler.reconcile_once()
        for jid in (done, lost, crashed, broke):
            ray.emit(f"qpeft-{jid}", ev("state", sub_state="TRAINING"))
        c.app.state.reconciler.reconcile_once()
        held = c.app.state.ledger.reserve(f"job:{crashed}", 500)  # in flight when the trainer dies
        assert c.get(f"/v1/jobs/{done}", headers=a).json()["state"] == "RUNNING"
    # --- the control plane is down; meanwhile in Ray: ---
    ray.emit(
        f"qpeft-{done}",
        ev("progress", step=5, max_steps=5, loss=1.0),
        ev("result", state="SUCCEEDED", reason="ok"),
        status="SUCCEEDED",
    )
    del ray.jobs[f"qpeft-{lost}"]
    ray.jobs[f"qpeft-{crashed}"].update(status="FAILED", message="Job entrypoint command failed with exit code 1")
    ray.emit(f"qpeft-{broke}", ev("result", state="BUDGET_EXHAUSTED", reason="tenant out of shots"), status="SUCCEEDED")
    ray.jobs.pop(f"qpeft-{early}")  # accepted, then the Ray cluster was replaced before it ran
    with TestClient(create_app(settings, ray=ray, reconcile=False)) as c:
        c.app.state.reconciler.reconcile_once()
        state = {jid: c.get(f"/v1/jobs/{jid}", headers=a).json() for jid in (done, lost, crashed, broke, early)}
        assert (state[done]["state"], state[done]["step"]) == ("SUCCEEDED", 5)
        assert state[lost]["state"] == "FAILED" and state[lost]["reason"].startswith("lost")
        assert state[crashed]["state"] == "FAILED" and "exit code 1" in state[crashed]["reason"]
        assert (state[broke]["state"], state[broke]["reason"]) == ("BUDGET_EXHAUSTED", "tenant out of shots")
        assert state[early]["state"] == "FAILED"
        # the dead trainer's open reservation is charged as lost, nothing stays held
        assert state[crashed]["shots"] == {**state[crashed]["shots"], "lost": 500, "reserved": 0}
        c.app.state.ledger.commit(held, 500)  # a late commit from the dead trainer changes nothing
        assert c.get("/v1/budget", headers=a).json()["shots"] == {
            "limit": 10**6,
            "spent": 0,
            "lost": 500,
            "reserved": 0,
            "remaining": 10**6 - 500,
        }


def test_only_a_killed_driver_is_resubmitted(tmp_path, sqlite_url):  # noqa: F811
    """A driver that died without a result event (SIGKILL, a lost supervisor node) is resubmitted, up to
    max_attempts submissions; a trainer that failed by itself, or said how it ended, is not."""
    ray = FakeRay()
    settings = make_settings(tmp_path / "data", sqlite_url, max_attempts=2)
    with TestClient(create_app(settings, ray=ray, reconcile=False)) as c:
        a = new_tenant(c, "acme", shots=10**6)
        killed, node_lost, crashed, told = (submit(c, a).json()["id"] for _ in range(4))
        rec = c.app.state.reconciler
        rec.reconcile_once()
        for jid in (killed, node_lost, crashed, told):
            ray.emit(f"qpeft-{jid}", ev("progress", step=2, max_steps=5, loss=1.0), "a plain line")
        rec.reconcile_once()
        held = c.app.state.ledger.reserve(f"job:{killed}", 300)  # a pool call in flight when the driver dies
        ray.emit(f"qpeft-{killed}", "last words", status="FAILED")  # read in the same pass as its end
        ray.jobs[f"qpeft-{killed}"].update(message="exit code -9", exit_code=-9)
        ray.jobs[f"qpeft-{node_lost}"].update(status="FAILED", error_type="JOB_SUPERVISOR_ACTOR_DIED")
        ray.jobs[f"qpeft-{crashed}"].update(status="FAILED", message="exit code 1", exit_code=1)
        ray.emit(f"qpeft-{told}", ev("result", state="FAILED", reason="bad data"), status="FAILED")
        ray.jobs[f"qpeft-{told}"]["exit_code"] = 137  # killed after it had said how it ended
        rec.reconcile_once()  # the two dead drivers' jobs go back to the queue ...
        rec.reconcile_once()  # ... and are submitted again
        state = {jid: c.get(f"/v1/jobs/{jid}", headers=a).json() for jid in (killed, node_lost, crashed, told)}
        for jid in (killed, node_lost):
            assert (state[jid]["state"], state[jid]["attempt"]) == ("RUNNING", 2)
            assert f"qpeft-{jid}-2" in ray.jobs and ray.jobs[f"qpeft-{jid}-2"]["env"]["QPEFT_ATTEMPT"] == "2"
        assert state[crashed]["state"] == "FAILED" and "exit code 1" in state[crashed]["reason"]
        assert (state[told]["state"], state[told]["reason"], state[told]["attempt"]) == ("FAILED", "bad data", 1)
        assert f"qpeft-{crashed}-2" not in ray.jobs and f"qpeft-{told}-2" not in ray.jobs
        # the dead attempt's call is charged as lost, once: its late commit changes nothing
        assert state[killed]["shots"] == {**state[killed]["shots"], "spent": 0, "lost": 300, "reserved": 0}
        c.app.state.ledger.commit(held, 300)
        assert c.get(f"/v1/jobs/{killed}", headers=a).json()["shots"]["lost"] == 300
        # the log goes on across attempts: the new attempt's lines follow the note on the old one
        ray.emit(f"qpeft-{killed}-2", "resumed", ev("progress", step=3, max_steps=5, loss=0.9))
        rec.reconcile_once()
        lines = c.get(f"/v1/jobs/{killed}/logs", headers=a).json()["lines"]
        assert [x["seq"] for x in lines] == [2, 3, 4, 5]
        assert [lines[i]["line"] for i in (0, 1, 3)] == ["a plain line", "last words", "resumed"]
        assert "attempt 1 of 2 ended when its driver died (exit code -9)" in lines[2]["line"]
        assert c.get(f"/v1/jobs/{killed}", headers=a).json()["step"] == 3
        # max_attempts=2: a second death ends the job
        ray.jobs[f"qpeft-{killed}-2"].update(status="FAILED", message="exit code -9", exit_code=-9)
        rec.reconcile_once()
        j = c.get(f"/v1/jobs/{killed}", headers=a).json()
        assert (j["state"], j["attempt"], j["reason"]) == ("FAILED", 2, "exit code -9")


def test_operations(env):
    app, c, ray = env
    a = new_tenant(c, "acme")
    assert c.get("/healthz").json() == {"status": "ok"}
    app.state.reconciler.ray = ray
    assert c.get("/readyz").status_code == 200
    ray.up = False
    r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["checks"] == {"database": "ok", "ray": "unreachable"}
    info = c.get("/v1/info", headers=a).json()
    assert info["mode"] == "cluster" or info["mode"] == "embedded"
    backends = {b["spec"]: b for b in c.get("/v1/backends", headers=a).json()}
    assert backends["exact"]["kind"] == "simulator" and backends["aer-noisy:FakeManilaV2"]["qubits"] == 5
    assert "ibm:" not in "".join(backends) or backends  # real devices only with an account
    assert c.get("/", follow_redirects=False).headers["location"] == "/dashboard/"
    assert "<html" in c.get("/dashboard/").text.lower()
    schema = c.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}/events", "/v1/estimate", "/v1/backends"} <= set(schema["paths"])
    nf = c.get("/v1/nowhere")
    assert nf.status_code == 404 and nf.json()["errors"][0]["fix"]


def test_jobs_get_the_database_url_without_its_password():
    # Ray shows a job's runtime_env on its dashboard: the password stays on the nodes (PGPASSWORD)
    url = "postgresql+psycopg://qpeft:s3cret@db.internal:5432/qpeft"
    assert job_database_url(url) == "postgresql+psycopg://qpeft@db.internal:5432/qpeft"
    assert job_database_url("sqlite:////var/lib/qpeft/qpeft.db") == "sqlite:////var/lib/qpeft/qpeft.db"


def test_burst_beyond_the_pool_and_threads_never_stalls(tmp_path, pg_admin, monkeypatch):  # noqa: F811
    """Far more requests at once than pooled connections (2) and threadpool threads (40): each request's
    sync dependency and endpoint run as separate threadpool hops, so a connection kept between hops could
    leave every thread waiting for a connection held by a request that waits for a thread. Every request
    must be answered (with the hazard, they fail after pool_timeout)."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.test_control_plane_support import _drop_schema, _pg_schema_url

    monkeypatch.setenv("QPEFT_DB_POOL_SIZE", "2")
    monkeypatch.setenv("QPEFT_DB_MAX_OVERFLOW", "0")
    monkeypatch.setenv("QPEFT_DB_POOL_TIMEOUT", "10")
    schema, url = _pg_schema_url(pg_admin)
    try:
        app = create_app(make_settings(tmp_path / "data", url), ray=FakeRay(), reconcile=False)
        with TestClient(app) as c:
            a = new_tenant(c, "acme")
            submit(c, a)
            with ThreadPoolExecutor(96) as pool:
                codes = list(pool.map(lambda _: c.get("/v1/jobs", headers=a).status_code, range(400)))
        assert codes == [200] * 400, {code: codes.count(code) for code in set(codes)}
    finally:
        _drop_schema(pg_admin, schema, url)
