"""docker-compose.yml run without Docker: every service's command starts as a local process, in the compose
dependency order, with the compose environment (env files, `environment:`, `${VAR:-default}` expansion),
each waiting for its dependencies' health checks, which run locally too. What Docker would provide is
stood in for: service names resolve to 127.0.0.1 (compose's DNS), volume mount points become directories
here (a named volume a temporary one, a bind mount its source), the image's PATH is the virtualenv's, the
fixed ports come from free ones through the same variables an operator would set, and the machine's
PostgreSQL (a fresh schema) replaces the `postgres` service. A real job then goes through the API onto
the Ray head, the trainer worker and the Aer quantum worker, whose node alone offers `qpu`.

The helpers here (`load_compose`, `start_order`) are shared with tests/test_deploy_manifests.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from services.control_plane.ray_jobs import free_ports
from tests.test_control_plane_support import SPEC, pg_admin, wait_for  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
SHARED = Path(os.environ.get("QPEFT_SHARED_DATA", ROOT.parent / "shared" / "data"))
VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")
ADMIN = "compose-test-admin"
STARTED = ["ray-head", "trainer-worker", "quantum-worker-aer", "api"]  # postgres: the machine's own


def _expand(value, env: dict):
    if isinstance(value, str):
        return VAR.sub(lambda m: env.get(m[1]) or (m[2] or ""), value).replace("$$", "$")
    if isinstance(value, list):
        return [_expand(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, env) for k, v in value.items()}
    return value


def load_compose(env: dict | None = None) -> dict:
    """The compose file as compose sees it: YAML merge keys resolved, variables expanded from `env`."""
    return _expand(yaml.safe_load(COMPOSE.read_text()), env or {})


def start_order(services: dict, names: list[str]) -> list[str]:
    """`names` in an order where every service comes after its depends_on (a cycle fails)."""
    done: list[str] = []

    def visit(name, path=()):
        assert name not in path, f"depends_on cycle: {path + (name,)}"
        for dep in services[name].get("depends_on") or {}:
            visit(dep, path + (name,))
        if name not in done:
            done.append(name)

    for n in names:
        visit(n)
    return done


def env_files(service: dict) -> list[tuple[Path, bool]]:
    out = []
    for entry in service.get("env_file") or []:
        path, required = (entry, True) if isinstance(entry, str) else (entry["path"], entry.get("required", True))
        out.append((ROOT / path, required))
    return out


def read_env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and line[0] != "#")
    return {k.strip(): v for k, v in pairs}


class LocalCompose:
    """The services as local processes, each in its own process group; `down()` leaves nothing running."""

    def __init__(self, project: dict, db_url: str):
        self.project, self.db_url = project, db_url
        self.tmp = Path(tempfile.mkdtemp(prefix="qpc-"))  # short: Ray's socket paths must fit 107 bytes
        self.mounts: dict[str, str] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts = 0

    def local(self, value: str) -> str:
        for target in sorted(self.mounts, key=len, reverse=True):
            value = value.replace(target, self.mounts[target])
        for name in self.project["services"]:
            value = re.sub(rf"(?<![\w-]){re.escape(name)}(?=:\d)", "127.0.0.1", value)
        return value

    def mount(self, spec: str) -> None:
        source, target = spec.split(":")[:2]
        if source in self.project.get("volumes", {}):
            local = self.tmp / "volumes" / source
            local.mkdir(parents=True, exist_ok=True)
            source = str(local)
        self.mounts[target] = str((ROOT / source).resolve())

    def env(self, service: dict) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "QPEFT_"))}
        env = {**base, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"}
        env["RAY_TMPDIR"] = str(self.tmp)  # this test's Ray sessions apart from any other Ray here
        for path, required in env_files(service):
            if path.name in ("secrets.env", "db.env"):  # the committed example stands in for the operator's copy
                path = path.with_name(path.name + ".example")
            if path.exists():
                env.update(read_env_file(path))
            else:
                assert not required, f"missing env file {path}"
        env.update({k: str(v) for k, v in (service.get("environment") or {}).items()})
        if "QPEFT_DATABASE_URL" in env:
            env["QPEFT_DATABASE_URL"] = self.db_url
        if "QPEFT_ADMIN_KEY" in env:
            env["QPEFT_ADMIN_KEY"] = ADMIN
        return {k: self.local(v) for k, v in env.items()}

    def up(self, name: str, timeout: float = 240) -> None:
        service = self.project["services"][name]
        for dep, cond in (service.get("depends_on") or {}).items():
            if dep in self.procs and cond.get("condition") == "service_healthy":
                self.healthy(dep, timeout)
        for spec in service.get("volumes") or []:
            self.mount(spec)
        self.launch(name)

    def launch(self, name: str) -> None:
        service = self.project["services"][name]
        cmd = [self.local(c) for c in service["command"]]
        log = open(self.tmp / f"{name}.log", "a")  # noqa: SIM115 - kept open for the process's life
        self.procs[name] = subprocess.Popen(
            cmd, cwd=self.tmp, env=self.env(service), stdout=log, stderr=log, start_new_session=True
        )

    def supervise(self) -> None:
        """Compose's `restart: unless-stopped`: a worker whose `ray start` gave up (a raylet slow to start
        on a loaded machine) is started again, as Docker would."""
        for name, proc in self.procs.items():
            if proc.poll() is not None and self.project["services"][name].get("restart") == "unless-stopped":
                assert self.restarts < 3, f"{name} keeps exiting\n{self.logs()}"
                self.restarts += 1
                self.launch(name)

    def healthy(self, name: str, timeout: float) -> None:
        test = self.project["services"][name]["healthcheck"]["test"]
        assert test[0] == "CMD", test
        cmd, env = [self.local(c) for c in test[1:]], self.env(self.project["services"][name])
        deadline = time.time() + timeout
        while subprocess.run(cmd, env=env, cwd=self.tmp, capture_output=True, timeout=60).returncode:
            if self.procs[name].poll() is not None or time.time() > deadline:
                raise AssertionError(f"{name} never became healthy\n{self.logs()}")
            time.sleep(2)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.tmp.glob("*.log")))

    def down(self) -> None:
        import psutil

        for p in reversed(self.procs.values()):  # `ray start --block` stops its node on SIGTERM
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        # Ray workers that outlived their raylet: only ours name this test's private temp dir
        for proc in psutil.process_iter(["cmdline"]):
            if any(str(self.tmp) in part for part in proc.info["cmdline"] or []):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


def submit_tiny_qpa(client, admin_key: str, max_steps: int, **training) -> tuple[dict, dict]:
    """A tenant made with the admin key, then a short QPA job on Aer with shots: (the tenant's key header, job)."""
    spec = {**SPEC, "max_steps": max_steps, "shots": 64}
    spec["training"] = {"batch_size": 4, "eval_max_batches": 1, **training}
    spec["dataset"] = {"train": "tinyshakespeare", "limit": 200, "max_length": 32, "eval_limit": 8}
    r = client.post("/v1/tenants", json={"name": "acme", "shots": 10**6}, headers={"X-API-Key": admin_key})
    assert r.status_code == 201, r.text
    key = {"X-API-Key": r.json()["api_key"]}
    r = client.post("/v1/jobs", json=spec, headers=key)
    assert r.status_code in (200, 201, 202), r.text
    return key, r.json()


@pytest.fixture
def pg_schema(pg_admin):  # noqa: F811
    from tests.test_control_plane_support import _drop_schema, _pg_schema_url

    schema, url = _pg_schema_url(pg_admin)
    yield url
    _drop_schema(pg_admin, schema, url)


@pytest.mark.slow
def test_compose_services_run_a_job(pg_schema):
    import httpx
    from ray.util.state import list_actors, list_nodes

    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    names = ("QPEFT_RAY_PORT", "QPEFT_RAY_DASHBOARD_PORT", "QPEFT_RAY_CLIENT_PORT", "QPEFT_API_PORT")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    project = load_compose({**{k: str(v) for k, v in ports.items()}, "QPEFT_SHARED_DATA_DIR": str(SHARED)})
    order = start_order(project["services"], STARTED)
    assert order.index("ray-head") < order.index("quantum-worker-aer") < order.index("api")
    stack = LocalCompose(project, pg_schema)
    try:
        for name in order:
            if name in STARTED:
                stack.up(name)
        stack.healthy("api", 180)
        dash = f"http://127.0.0.1:{ports['QPEFT_RAY_DASHBOARD_PORT']}"

        def nodes():
            stack.supervise()
            alive = [n for n in list_nodes(address=dash, detail=True) if n.state == "ALIVE"]
            print(time.strftime("%X"), [(n.node_id[:8], n.resources_total) for n in alive])
            return alive if len(alive) == 3 else None

        found = wait_for(nodes, timeout=240, interval=2, what="three Ray nodes")
        qpu_nodes = [n.node_id for n in found if n.resources_total.get("qpu")]
        assert len(qpu_nodes) == 1 and [n.resources_total.get("qpu") for n in found].count(2.0) == 1

        api = f"http://127.0.0.1:{ports['QPEFT_API_PORT']}"
        with httpx.Client(base_url=api, timeout=30) as c:
            key, job = submit_tiny_qpa(c, ADMIN, max_steps=2)

            def finished():
                stack.supervise()
                j = c.get(f"/v1/jobs/{job['id']}", headers=key).json()
                return j if j["state"] not in ("QUEUED", "RUNNING") else None

            j = wait_for(finished, timeout=420, interval=2, what="the job")
            assert j["state"] == "SUCCEEDED", f"{j['reason']}\n{stack.logs()}"
            assert j["step"] == 2 and j["shots"]["spent"] == job["shots"]["forecast"] > 0
        workers = list_actors(address=dash, filters=[("class_name", "=", "QuantumWorker")], detail=True)
        assert workers and {w.node_id for w in workers} == set(qpu_nodes)
    except BaseException:
        print(stack.logs())  # pytest shows it with the failure
        raise
    finally:
        stack.down()
