"""Fixtures and helpers for the control-plane tests (no tests here): databases (SQLite and a fresh PostgreSQL
schema per test), a fake Ray job server, app factories and a live uvicorn server."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from services.control_plane.ray_jobs import free_port

ROOT = Path(__file__).resolve().parents[1]
STANDIN = ROOT / "tests" / "control_plane_standin_trainer.py"
PG_URL = os.environ.get("QPEFT_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
ADMIN = "test-admin-key"
SPEC = {
    "name": "tiny qpa",
    "base_model": "tiny-gpt2",
    "dataset": "tinyshakespeare",
    "method": "qpa",
    "method_config": {"r": 2, "n_mlp": 64, "qnn_depth": 2},
    "executor": "aer",
    "shots": 100,
    "max_steps": 5,
}


@pytest.fixture(scope="session")
def pg_admin():
    """An engine on the `test` database, or a skip when PostgreSQL is not there."""
    sa = pytest.importorskip("sqlalchemy")
    pytest.importorskip("psycopg")
    engine = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as c:
            c.execute(sa.text("SELECT 1"))
    except Exception as e:
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {type(e).__name__}")
    yield engine
    engine.dispose()


def _pg_schema_url(pg_admin) -> tuple[str, str]:
    import sqlalchemy as sa

    schema = f"qpeft_test_{uuid.uuid4().hex[:10]}"
    with pg_admin.connect() as c:
        c.execute(sa.text(f"CREATE SCHEMA {schema}"))
    return schema, f"{PG_URL}?options=-csearch_path%3D{schema}"


def _drop_schema(pg_admin, schema: str, url: str) -> None:
    import sqlalchemy as sa

    from services.contract.engine import dispose

    dispose(url)
    with pg_admin.connect() as c:
        c.execute(sa.text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh, empty database per test: a SQLite file, or a new schema in PostgreSQL's `test` database
    (dropped afterwards)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'qpeft.db'}"
        yield url
        from services.contract.engine import dispose

        dispose(url)
        return
    pg_admin = request.getfixturevalue("pg_admin")
    schema, url = _pg_schema_url(pg_admin)
    yield url
    _drop_schema(pg_admin, schema, url)


@pytest.fixture
def sqlite_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'qpeft.db'}"
    yield url
    from services.contract.engine import dispose

    dispose(url)


class FakeRay:
    """The Ray job server as the reconciler sees it (RayJobs' methods), driven by the test."""

    dashboard_url = "http://ray.invalid:8265"

    def __init__(self):
        self.jobs: dict[str, dict] = {}
        self.up = True
        self.capacity = {"CPU": 8.0, "GPU": 0.0, "qpu": 2.0}  # a CPU-only cluster

    def reachable(self) -> bool:
        return self.up

    def resources(self) -> dict[str, float]:
        if not self.up:
            raise ConnectionError("the fake Ray is down")
        return dict(self.capacity)

    def submit(self, sid, entrypoint, env, metadata):
        self.jobs.setdefault(sid, {"status": "PENDING", "log": "", "entrypoint": entrypoint, "env": env})

    def status(self, sid):
        from services.control_plane.ray_jobs import RayStatus

        j = self.jobs.get(sid)
        return None if j is None else RayStatus(j["status"], j.get("message"), j.get("error_type"), j.get("exit_code"))

    def logs(self, sid) -> str:
        return self.jobs[sid]["log"]

    def stop(self, sid):
        self.jobs[sid]["status"] = "STOPPED"

    # --- driving a job ---
    def emit(self, sid, *events, status="RUNNING"):
        j = self.jobs[sid]
        for e in events:
            j["log"] += (e if isinstance(e, str) else "QPEFT_EVENT " + json.dumps(e)) + "\n"
        j["status"] = status


def make_settings(data_dir: Path, db_url: str, **kw):
    from services.control_plane.settings import Settings

    values = {
        "data_dir": data_dir,
        "database_url": db_url,
        "admin_key": ADMIN,
        "pepper": "test-pepper",
        "start_ray": False,
        "trainer_command": f"{{python}} {STANDIN}",
        "trainer_python": sys.executable,
    }
    values.update(kw)
    return Settings(**values)


def new_tenant(client, name: str, shots=None, qpu_seconds=None) -> dict:
    r = client.post(
        "/v1/tenants", json={"name": name, "shots": shots, "qpu_seconds": qpu_seconds}, headers={"X-API-Key": ADMIN}
    )
    assert r.status_code == 201, r.text
    return {"X-API-Key": r.json()["api_key"]}


class LiveServer:
    """uvicorn in a thread on a free port (for the CLI and the browser)."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=15)


def wait_for(predicate, timeout=60.0, interval=0.2, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
