"""The API's edge against a probing tenant (issue 14): strict types, executors and sizes checked against
this server at submit, a body size limit, the key checked before the body, and the operator-only surfaces
(the Ray dashboard link, /metrics by tenant). A fake Ray job server as in test_control_plane_api.py;
tests/test_control_plane_ray.py checks the cluster's resources read from a real Ray head."""

from __future__ import annotations

import httpx
import pytest
from fastapi import Request
from fastapi.testclient import TestClient

from services.control_plane.app import create_app
from services.control_plane.body_limit import body_limit
from services.control_plane.routers import backends
from tests.test_control_plane_support import (  # noqa: F401  (fixtures)
    ADMIN,
    SPEC,
    FakeRay,
    LiveServer,
    db_url,
    make_settings,
    new_tenant,
    pg_admin,
    sqlite_url,
)

A = {"X-API-Key": ADMIN}


@pytest.fixture
def env_any_db(tmp_path, db_url):  # noqa: F811
    ray = FakeRay()
    app = create_app(make_settings(tmp_path / "data", db_url, metrics_token="scrape-token"), ray=ray, reconcile=False)
    with TestClient(app) as client:
        yield app, client, ray


def first_error(r, status=422) -> dict:
    assert r.status_code == status, r.text
    return r.json()["errors"][0]


@pytest.mark.parametrize(
    "change, field, words, fix",
    [
        ({"max_steps": True}, "body.max_steps", "valid integer", "integer"),
        ({"max_steps": 2.0}, "body.max_steps", "valid integer", "integer"),
        ({"shots": "100"}, "body.shots", "valid integer", "integer"),
        ({"training": {"eval_at_start": "yes"}}, "body.training.eval_at_start", "valid boolean", "true or false"),
        ({"training": {"lr": "0.01"}}, "body.training.lr", "valid number", "number"),
        ({"scaling": {"use_gpu": 1}}, "body.scaling.use_gpu", "valid boolean", "true or false"),
        ({"method_config": {"r": 1e9}}, "body.method_config.r", "valid integer", "integer"),
        ({"method_config": {"r": "4"}}, "body.method_config.r", "valid integer", "integer"),
        ({"method_config": {"r": True}}, "body.method_config.r", "valid integer", "integer"),
        ({"method_config": {"r": 10**9}}, "body.method_config.r", "limit of 1024", "r <= 1024"),
        ({"method_config": {"r": 2, "lora_alpha": "8"}}, "body.method_config.lora_alpha", "valid number", "number"),
        ({"method_config": {"r": 2, "n_mlp": 10**6}}, "body.method_config.n_mlp", "limit of 65536", "65536"),
        ({"executor": "ibm:../../etc/passwd"}, "body.executor", "not an IBM backend name", "GET /v1/backends"),
        ({"executor": "ibm:"}, "body.executor", "not an IBM backend name", "GET /v1/backends"),
        # checked against this server: the model, the cluster (the fake's 8 CPUs, no GPU), the IBM account
        # tiny-gpt2's c_attn is 64 -> 192: a rank above 64 adds nothing
        ({"method_config": {"r": 65, "n_mlp": 64}}, "body.method_config.r", "(64) of tiny-gpt2", "r <= 64"),
        (
            {"method": "lora", "executor": "exact", "shots": None, "method_config": {"r": 100}},
            "body.method_config.r",
            "(64)",
            "r <= 64",
        ),
        # r = 2 on 2 x (64 + 192): m = 1024 numbers to generate
        (
            {"method_config": {"r": 2, "n_mlp": 4096, "mapping_widths": [8]}},
            "body.method_config.n_mlp",
            "m = r x sum",
            "n_mlp <= 1024",
        ),
        ({"scaling": {"num_workers": 256, "use_gpu": True}}, "body.scaling.use_gpu", "0 GPUs", "use_gpu to false"),
        ({"scaling": {"num_workers": 9}}, "body.scaling.num_workers", "8 CPU(s)", "at most 8 workers"),
        ({"executor": "ibm:ibm_torino"}, "body.executor", "no IBM account is configured", "GET /v1/backends"),
    ],
)
def test_refused_at_submit_and_estimate(env_any_db, change, field, words, fix):
    _, c, _ = env_any_db
    a = new_tenant(c, "acme")
    for path in ("/v1/jobs", "/v1/estimate"):
        err = first_error(c.post(path, json={**SPEC, **change}, headers=a))
        assert err["field"] == field and words in err["message"] and fix in err["fix"], err
    assert c.get("/v1/jobs", headers=a).json()["total"] == 0


def test_gpu_workers_fit_a_gpu_cluster(env_any_db):
    _, c, ray = env_any_db
    a = new_tenant(c, "acme")
    ray.capacity["GPU"] = 2.0
    c.app.state.capacity._until = 0.0  # past the TTL: read again
    two = {**SPEC, "scaling": {"num_workers": 2, "use_gpu": True}}
    assert c.post("/v1/estimate", json=two, headers=a).status_code == 200
    err = first_error(c.post("/v1/estimate", json={**SPEC, "scaling": {"num_workers": 3, "use_gpu": True}}, headers=a))
    assert err["field"] == "body.scaling.num_workers" and "2 GPU(s)" in err["message"]
    ray.capacity = {"qpu": 2.0}  # a 0-CPU head whose workers have not joined yet: not known, no refusal
    c.app.state.capacity._until = 0.0
    assert c.post("/v1/estimate", json={**SPEC, "scaling": {"num_workers": 200}}, headers=a).status_code == 200
    ray.up = False  # Ray does not answer: no check, the job waits in the queue as before
    c.app.state.capacity._until = 0.0
    assert c.post("/v1/jobs", json={**SPEC, "scaling": {"num_workers": 200}}, headers=a).status_code == 201


def test_ibm_backends_only_those_listed(env_any_db, monkeypatch):
    """An IBM account's device list, mocked (the IBM cloud is the one thing these tests mock)."""
    _, c, _ = env_any_db
    a = new_tenant(c, "acme")
    torino = {"spec": "ibm:ibm_torino", "kind": "ibm", "qubits": 133, "exact": False, "status": "configured"}
    local = [b for b in backends.listing() if b["kind"] != "ibm"]
    monkeypatch.setattr(backends, "listing", lambda: [*local, torino])
    ok = {**SPEC, "executor": "ibm:ibm_torino", "max_steps": 1}
    assert c.post("/v1/estimate", json=ok, headers=a).status_code == 200
    err = first_error(c.post("/v1/jobs", json={**ok, "executor": "ibm:ibm_kyiv"}, headers=a))
    assert err["field"] == "body.executor" and "not among the IBM devices" in err["message"]
    assert err["fix"] == "use one of ibm:ibm_torino"
    err = first_error(c.post("/v1/jobs", json={**ok, "executor": "ibm:../../etc/passwd"}, headers=a))
    assert err["field"] == "body.executor" and "passwd" not in err["message"]


def test_ibm_backends_named_by_the_operator(tmp_path, sqlite_url):  # noqa: F811
    """QPEFT_IBM_BACKENDS: the quantum workers hold the IBM account, the API only the device names."""
    from services.control_plane.settings import Settings

    assert Settings.from_env(data_dir=tmp_path).ibm_backends == []
    settings = make_settings(tmp_path / "data", sqlite_url, ibm_backends=["ibm_torino", "ibm_fez"])
    with TestClient(create_app(settings, ray=FakeRay(), reconcile=False)) as c:
        a = new_tenant(c, "acme")
        ok = {**SPEC, "executor": "ibm:ibm_fez", "max_steps": 1}
        assert c.post("/v1/jobs", json=ok, headers=a).status_code == 201
        err = first_error(c.post("/v1/jobs", json={**ok, "executor": "ibm:ibm_kyiv"}, headers=a))
        assert err["field"] == "body.executor" and err["fix"] == "use one of ibm:ibm_fez, ibm:ibm_torino"


def test_valid_specs_still_pass(env_any_db):
    _, c, _ = env_any_db
    a = new_tenant(c, "acme")
    specs = [
        SPEC,
        {**SPEC, "training": {"lr": 1, "max_grad_norm": 2, "eval_at_start": True}, "qpu_seconds_limit": 5},
        {**SPEC, "method_config": {"r": 64, "n_mlp": 1024, "qnn_depth": 1, "lora_alpha": 16, "mapping_widths": [8]}},
        {**SPEC, "method": "lora", "executor": "exact", "shots": None, "method_config": {"r": 8, "lora_alpha": 16}},
        {**SPEC, "scaling": {"num_workers": 8, "use_gpu": False}},
    ]
    for spec in specs:
        r = c.post("/v1/jobs", json=spec, headers=a)
        assert r.status_code == 201, r.text


def test_body_size_limit(tmp_path, sqlite_url):  # noqa: F811
    """Over a real socket: a declared length over the limit is refused unread; a chunked body (no length)
    is cut off at the limit; a route marked with its own limit (a streamed upload) is exempt."""
    app = create_app(make_settings(tmp_path / "data", sqlite_url), ray=FakeRay(), reconcile=False)

    @body_limit(None)
    async def upload(request: Request) -> dict:
        return {"bytes": sum([len(chunk) async for chunk in request.stream()])}

    app.router.add_api_route("/v1/test-upload", upload, methods=["POST"])
    limit = app.state.settings.max_body_bytes
    assert limit == 1 << 20  # the default: 1 MiB
    ten_mb = b'{"name": "' + b"x" * 10_000_000 + b'"}'
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        a = new_tenant(http, "acme")
        for headers in ({}, a):
            err = first_error(http.post("/v1/jobs", content=ten_mb, headers=headers), 413)
            assert err["field"] == "body" and f"limit of {limit} bytes" in err["message"]
            assert f"at most {limit} bytes" in err["fix"]

        def chunks(total: int):
            for _ in range(total // 65536):
                yield b" " * 65536

        r = http.post("/v1/jobs", content=chunks(10_000_000), headers={"content-type": "application/json", **a})
        assert "content-length" not in r.request.headers
        err = first_error(r, 413)
        assert err["field"] == "body" and f"limit of {limit} bytes" in err["message"]
        # a body under the limit is read and validated as before
        small = http.post("/v1/jobs", content=chunks(65536 * 4), headers={"content-type": "application/json", **a})
        assert small.status_code == 422
        assert http.post("/v1/test-upload", content=chunks(3 * limit)).json() == {"bytes": 3 * limit}
        # the real upload route, in an included router, keeps its own limit (max_upload_bytes) above this one
        text = b"".join(b"line %d of a corpus larger than the JSON body limit\n" % i for i in range(limit // 40))
        up = http.post("/v1/datasets", params={"name": "big.txt"}, content=text, headers=a)
        assert len(text) > limit and up.status_code == 201 and up.json()["size_bytes"] == len(text), up.text
        assert http.get("/healthz").status_code == 200


def test_key_is_checked_before_the_body(env_any_db):
    _, c, _ = env_any_db
    a = new_tenant(c, "acme")
    for body in (b"{not json", b'{"max_steps": true}', b"[]"):
        for headers in ({}, {"X-API-Key": "qpk_wrong"}, {"Authorization": "Bearer qpk_wrong"}):
            for path in ("/v1/jobs", "/v1/estimate"):
                r = c.post(path, content=body, headers={"content-type": "application/json", **headers})
                assert first_error(r, 401)["field"] == "header.X-API-Key", (path, body, headers)
        r = c.post("/v1/tenants", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 401
    # with a valid key the body's own errors come back
    assert (
        c.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json", **a}).status_code == 422
    )
    bad = c.post("/v1/jobs", json={**SPEC, "max_steps": True}, headers={"Authorization": f"Bearer {a['X-API-Key']}"})
    assert first_error(bad)["field"] == "body.max_steps"


def test_operator_only_surfaces(env_any_db):
    app, c, ray = env_any_db
    a = new_tenant(c, "acme")
    b = new_tenant(c, "beta")
    job = c.post("/v1/jobs", json=SPEC, headers=a).json()
    c.post("/v1/jobs", json=SPEC, headers=b)
    app.state.reconciler.ray = ray
    # tenants never get the Ray dashboard (no login, and it takes job submissions)
    assert "ray" not in job["links"] and "ray" not in c.get(f"/v1/jobs/{job['id']}", headers=a).json()["links"]
    assert all("ray" not in j["links"] for j in c.get("/v1/jobs", headers=a).json()["items"])
    assert c.get("/v1/info", headers=a).json()["ray_dashboard_url"] is None
    assert c.get("/v1/info", headers=A).json()["ray_dashboard_url"] == FakeRay.dashboard_url

    public = c.get("/metrics")
    assert public.status_code == 200
    assert "acme" not in public.text and "beta" not in public.text and job["id"] not in public.text
    assert 'qpeft_jobs{state="QUEUED"} 2.0' in public.text and "tenant=" not in public.text
    for creds in (A, {"Authorization": "Bearer scrape-token"}, {"X-API-Key": "scrape-token"}):
        full = c.get("/metrics", headers=creds)
        assert full.status_code == 200 and 'qpeft_jobs{state="QUEUED",tenant="acme"} 1.0' in full.text, creds
    assert first_error(c.get("/metrics", headers=a), 403)["field"] == "header.X-API-Key"
    assert c.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_yaml_specs_keep_their_numbers(tmp_path):
    """YAML 1.1 reads 1e-3 as a string, which the strict API refuses: the CLI reads it as the number."""
    from services.cli import load_spec

    path = tmp_path / "job.yaml"
    path.write_text("name: 1e5 steps\nmax_steps: 10\ntraining:\n  lr: 1e-3\n  weight_decay: 2.5E+1\n")
    assert load_spec(path) == {"name": "1e5 steps", "max_steps": 10, "training": {"lr": 0.001, "weight_decay": 25.0}}
