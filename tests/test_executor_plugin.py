"""Adding an executor touches one place: a module that registers its kind (tests/executor_plugin.py), named in
QPEFT_EXECUTOR_PLUGINS for the control plane and the job. A QPA job then runs on it through the API with the
real trainer on the session's Ray cluster: validated, forecast, listed, run by the quantum pool's workers."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.control_plane.app import create_app
from tests.test_control_plane_ray import REAL_SPEC, final, ray_jobs_url, real_trainer_settings  # noqa: F401
from tests.test_control_plane_support import new_tenant, sqlite_url  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def test_a_registered_executor_runs_a_job_through_the_api(tmp_path, sqlite_url, ray_jobs_url, monkeypatch):  # noqa: F811
    from services.control_plane.routers import backends

    monkeypatch.setenv("QPEFT_EXECUTOR_PLUGINS", "tests.executor_plugin")
    monkeypatch.setitem(backends._cache, "items", None)  # listed before the plugin was named
    from tests.executor_plugin import TIMING

    settings = real_trainer_settings(tmp_path, sqlite_url, ray_jobs_url)
    settings.job_env = {"QPEFT_EXECUTOR_PLUGINS": "tests.executor_plugin", "PYTHONPATH": str(ROOT)}
    spec = {**REAL_SPEC, "executor": "dummy:one", "shots": 64, "max_steps": 2}
    with TestClient(create_app(settings)) as c:
        key = new_tenant(c, "acme", shots=100_000)
        listed = {b["spec"] for b in c.get("/v1/backends", headers=key).json()}
        assert "dummy:one" in listed
        bad = c.post("/v1/jobs", json={**spec, "shots": None}, headers=key)
        assert bad.status_code == 422 and "samples circuits" in bad.text  # needs_shots, from the kind
        est = c.post("/v1/estimate", json=spec, headers=key).json()
        # QPU time from the kind's model: 4 jobs (2 forwards, 2 gradient calls) plus every shot's time
        assert est["shots"] == 2 * 17 * 64 and est["jobs"] == 4
        assert est["qpu_seconds"] == pytest.approx(4 * TIMING.per_job_s + est["shots"] * TIMING.per_shot_s)
        job = c.post("/v1/jobs", json=spec, headers=key).json()
        j = final(c, key, job["id"], timeout=300)
        assert j["state"] == "SUCCEEDED", j["reason"]
        assert j["shots"]["spent"] == job["shots"]["forecast"] == est["shots"]
        lines = [x["line"] for x in c.get(f"/v1/jobs/{job['id']}/logs?tail=500", headers=key).json()["lines"]]
        assert any("quantum workers (dummy:one)" in line for line in lines), lines[-20:]
        # the pool charged the kind's estimate (nothing reports usage), marked as estimated
        assert j["shots"]["qpu_seconds"] == pytest.approx(j["shots"]["qpu_seconds_estimated"])
        assert j["shots"]["qpu_seconds"] == pytest.approx(est["qpu_seconds"], rel=0.2)
