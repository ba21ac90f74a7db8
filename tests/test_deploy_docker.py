"""The image built from deploy/docker/Dockerfile and docker-compose.yml run on a real Docker engine, on the
host's network (deploy/docker/compose.host.yml: every listener on 127.0.0.1, no bridge network).

Where no engine runs, this installs Debian's docker.io and docker-compose (as root) and starts `dockerd`
without a bridge, stopping it by its PID at the end; it skips, naming the reason, where that is refused.
The base image is the debootstrapped one (deploy/docker/make-base.sh; QPEFT_TEST_BASE_IMAGE picks another)
and every wheel comes from deploy/docker/wheelhouse.sh's directory served on 127.0.0.1, so the build asks
no registry or index. The built image (qpeft:test) and the wheel directory (~/.cache/qpeft/wheels) stay for
the next run: the build's dependency layers are cached, only changed code rebuilds.

The stack: Ray head, trainer worker, Aer quantum worker and API, with this machine's PostgreSQL (a fresh
schema) for the `postgres` service. A QPA job on Aer goes through the API; its quantum workers must run in
the quantum-worker container, which then crashes mid-job (Docker restarts it), and two steps later the job's
driver is killed in the head's container: the job must still succeed, as attempt 2 resumed from a checkpoint,
with the shots of dead work charged as lost exactly as the pool's ledger rows say. Teardown leaves no
container, volume or process of its own.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from services.control_plane.ray_jobs import free_ports
from tests.test_control_plane_support import pg_admin, wait_for  # noqa: F401  (fixture)
from tests.test_deploy_compose import COMPOSE, SHARED, pg_schema, submit_tiny_qpa  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
HOST_OVERRIDE = ROOT / "deploy" / "docker" / "compose.host.yml"
# Outside the checkout, so that a fresh clone on the same machine (CI) finds the wheels of the last run.
WHEELS = Path(os.environ.get("QPEFT_WHEELHOUSE") or Path.home() / ".cache" / "qpeft" / "wheels")
IMAGE = "qpeft:test"
BASE = os.environ.get("QPEFT_TEST_BASE_IMAGE", "qpeft-base:bookworm")
ADMIN = "docker-test-admin"
STACK = ["ray-head", "trainer-worker", "quantum-worker-aer", "api"]  # postgres: the machine's own

# Part of `make test` wherever an engine runs or can be started. QPEFT_DOCKER_TEST=0 skips it (a developer's
# quick run); a cold run (base image, wheels, image) adds minutes, see docs/deploy.md.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("QPEFT_DOCKER_TEST") == "0", reason="QPEFT_DOCKER_TEST=0 skips it"),
]


def run(*cmd, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and out.returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def engine_up() -> bool:
    return shutil.which("docker") is not None and not subprocess.run(["docker", "info"], capture_output=True).returncode


def apt_install(*packages: str) -> str | None:
    """None, or why Debian's packages could not be installed."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    for cmd in (["apt-get", *lock, "update", "-qq"], ["apt-get", *lock, "install", "-y", "-qq", *packages]):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if out.returncode:
            return f"{' '.join(cmd[:2])} ... failed: {out.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="module")
def docker_engine():
    """A running Docker engine: the one already there, or dockerd started here and stopped by its PID."""
    tools = ("docker", "dockerd", "docker-compose")
    if engine_up() and shutil.which("docker-compose"):
        yield
        return
    if os.geteuid() != 0:
        pytest.skip("no Docker engine running, and starting one needs root")
    if not all(shutil.which(t) for t in tools) and (why := apt_install("docker.io", "docker-compose")):
        pytest.skip(f"Docker could not be installed: {why}")
    log = Path(tempfile.mkdtemp(prefix="qpeft-dockerd-")) / "dockerd.log"
    # No bridge (it would hand out private-range addresses) and no iptables rules: containers use the host's
    # network only. The default data root keeps the images, the build cache, between runs.
    with open(log, "w") as f:
        dockerd = subprocess.Popen(
            ["dockerd", "--bridge=none", "--iptables=false", "--ip-masq=false"], stdout=f, stderr=f
        )
    try:
        deadline = time.time() + 60
        while not engine_up():
            if dockerd.poll() is not None or time.time() > deadline:
                pytest.skip(f"dockerd did not start here: {log.read_text()[-500:]}")
            time.sleep(1)
        yield
    finally:
        dockerd.send_signal(signal.SIGTERM)  # it stops its containerd too
        try:
            dockerd.wait(60)
        except subprocess.TimeoutExpired:
            dockerd.kill()
            dockerd.wait()
        shutil.rmtree(log.parent, ignore_errors=True)


def image_id(name: str) -> str | None:
    out = run("docker", "image", "inspect", "-f", "{{.Id}}", name, check=False)
    return out.stdout.strip() if not out.returncode else None


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(directory: Path, port: int):
    """A read-only HTTP server on 127.0.0.1 for `directory` (pip's find-links for the build). The URL is part of
    the build's cache key (a build arg the install steps read), so it is the same every run where the port is
    free: another port rebuilds the dependency layers."""
    handler = functools.partial(QuietHandler, directory=str(directory))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError:
        print(f"port {port} is taken: serving the wheels elsewhere, so the dependency layers are rebuilt")
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def image(docker_engine):
    """qpeft:test built from the working tree on the offline base, with the wheels from WHEELS."""
    if image_id(BASE) is None:
        if BASE != "qpeft-base:bookworm":
            run("docker", "pull", BASE, timeout=600)
        else:
            if not shutil.which("debootstrap") and (why := apt_install("debootstrap")):
                pytest.skip(f"debootstrap could not be installed: {why}")
            run("sh", str(ROOT / "deploy" / "docker" / "make-base.sh"), BASE, timeout=1200)
    t0 = time.time()
    # this interpreter is the image's platform (CPython 3.11, Linux x86_64) and has this host's pip settings
    run(
        "sh",
        str(ROOT / "deploy" / "docker" / "wheelhouse.sh"),
        str(WHEELS),
        env={**os.environ, "PYTHON": sys.executable},
        timeout=1800,
    )
    t1, old = time.time(), image_id(IMAGE)
    with serve(WHEELS, int(os.environ.get("QPEFT_TEST_WHEELS_PORT", "8099"))) as wheels:
        run(
            "docker", "build", "--network", "host", "-f", "deploy/docker/Dockerfile", "-t", IMAGE,
            "--build-arg", f"PYTHON_IMAGE={BASE}", "--build-arg", f"PIP_WHEELS={wheels}", ".",
            cwd=ROOT, timeout=2400, env={**os.environ, "DOCKER_BUILDKIT": "0"},
        )  # fmt: skip
    print(f"wheelhouse {t1 - t0:.0f} s, docker build {time.time() - t1:.0f} s")
    if old and old != image_id(IMAGE):
        run("docker", "rmi", old, check=False)  # the previous build's image, now untagged
    return IMAGE


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's `!reset` tag (an override file's way to drop a key the files before it set)."""


RESET = object()
ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)


def load_host_override() -> dict:
    return yaml.load(HOST_OVERRIDE.read_text(), ComposeLoader)  # noqa: S506 - a SafeLoader plus one tag


def v1_compose(directory: Path) -> list[Path]:
    """docker-compose.yml and compose.host.yml as Debian's docker-compose 1.29 reads them. It lacks three Compose
    v2 features the files use: the top-level `name` (the project is named with -p instead), optional env files
    (only the IBM worker, in profile `ibm` and not started here, has one) and `!reset` (applied here: the reset
    keys are dropped from the base file)."""
    base, override = yaml.safe_load(COMPOSE.read_text()), load_host_override()
    base.pop("name")
    for name, service in base["services"].items():
        service["env_file"] = [e for e in service.get("env_file", []) if isinstance(e, str)]
        changes = override["services"].get(name, {})
        for key in [k for k, v in changes.items() if v is RESET]:
            service.pop(key, None)
            del changes[key]
    paths = [directory / "docker-compose.yml", directory / "compose.host.yml"]
    for path, project in zip(paths, (base, override), strict=True):
        path.write_text(yaml.safe_dump(project, sort_keys=False))
    return paths


class Stack:
    """The compose project, on the host's network, from a temporary project directory holding the compose file
    and this run's env files (the operator's deploy/*.env in the checkout are never read or written)."""

    def __init__(self, db_url: str):
        self.dir = Path(tempfile.mkdtemp(prefix="qpeft-compose-"))
        self.name = f"qpeft-test-{uuid.uuid4().hex[:8]}"
        names = ["QPEFT_RAY_PORT", "QPEFT_RAY_DASHBOARD_PORT", "QPEFT_RAY_CLIENT_PORT", "QPEFT_API_PORT"]
        for node in ("HEAD", "TRAINER", "AER"):  # compose.host.yml's fixed agent ports, free ones here
            names += [
                f"QPEFT_RAY_{node}_{p}" for p in ("AGENT_PORT", "AGENT_GRPC_PORT", "RUNTIME_ENV_PORT", "METRICS_PORT")
            ]
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.files = v1_compose(self.dir)
        deploy = self.dir / "deploy"
        deploy.mkdir()
        shutil.copy(ROOT / "deploy" / "compose.env", deploy / "compose.env")
        pepper = uuid.uuid4().hex
        (deploy / "secrets.env").write_text(
            f"QPEFT_DATABASE_URL={db_url}\nQPEFT_ADMIN_KEY={ADMIN}\nQPEFT_PEPPER={pepper}\n"
        )
        (deploy / "db.env").write_text("PGPASSWORD=\n")  # the machine's PostgreSQL trusts 127.0.0.1
        self.env = {
            **os.environ,
            **{k: str(v) for k, v in self.ports.items()},
            "QPEFT_IMAGE": IMAGE,
            "QPEFT_SHARED_DATA_DIR": str(SHARED),
            "QPEFT_SHM_SIZE": "1gb",
            "QPEFT_RAY_OBJECT_STORE_BYTES": str(400 * 2**20),
        }

    def compose(self, *args, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        files = [arg for path in self.files for arg in ("-f", str(path))]
        return run("docker-compose", "-p", self.name, *files, *args, timeout=timeout, check=check, env=self.env)

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def health(self, service: str) -> str:
        state = run("docker", "inspect", "-f", "{{json .State}}", self.container(service)).stdout
        state = json.loads(state)
        return state.get("Health", {}).get("Status") or state["Status"]

    def processes(self, service: str) -> list[str]:
        """Command lines of the processes running in the service's container."""
        script = "import psutil\nfor p in psutil.process_iter(['cmdline']): print(' '.join(p.info['cmdline'] or []))"
        return run("docker", "exec", self.container(service), "python", "-c", script).stdout.splitlines()

    def crash(self, service: str) -> None:
        """SIGKILL the container's init from the host, as the kernel's OOM killer or a crash would: no goodbye to
        Ray. Not `docker kill`, which Docker counts as a manual stop: `restart: unless-stopped` would leave the
        container down (seen in the first real run)."""
        pid = int(run("docker", "inspect", "-f", "{{.State.Pid}}", self.container(service)).stdout)
        assert pid > 0, f"{service} is not running"
        os.kill(pid, signal.SIGKILL)

    def kill_process(self, service: str, argument: str) -> None:
        """SIGKILL the one process in the service's container that has `argument` on its command line."""
        script = (
            "import os, psutil, sys\n"
            "ps = [p for p in psutil.process_iter(['cmdline']) if sys.argv[1] in (p.info['cmdline'] or [])"
            " and p.pid != os.getpid()]\n"
            "assert len(ps) == 1, [p.info['cmdline'] for p in ps]\n"
            "ps[0].kill()"
        )
        run("docker", "exec", self.container(service), "python", "-c", script, argument)

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "60", check=False).stdout

    def down(self) -> None:
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "30", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def leftovers(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.name}"
        containers = run("docker", "ps", "-aq", "--filter", label).stdout.split()
        volumes = run("docker", "volume", "ls", "-q", "--filter", label).stdout.split()
        return containers + volumes


def ledger_rows(db_url: str, job_id: str) -> dict[str, list[int]]:
    """The job's shot reservations as the quantum pool settled them: committed and released (lost) shots."""
    import sqlalchemy as sa

    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as c:
            rows = c.execute(
                sa.text("SELECT state, actual FROM reservations WHERE key = :key"), {"key": f"job:{job_id}"}
            ).all()
    finally:
        engine.dispose()
    out: dict[str, list[int]] = {}
    for state, actual in rows:
        out.setdefault(state, []).append(actual)
    return out


@pytest.mark.timeout(5400)  # a cold build (base, wheels, image) takes most of it: see docs/deploy.md
def test_image_and_compose_stack_survive_a_dead_quantum_worker(image, pg_schema):  # noqa: F811
    import httpx
    from ray.util.state import list_actors, list_nodes

    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    stack = Stack(pg_schema)
    try:
        # The head first, until its compose health check passes (Docker restarts it if Ray gives up starting on a
        # loaded host; compose 1.29 would abort on the first "unhealthy"), then the workers, which compose starts
        # only on a healthy head, then the API: its other dependency, PostgreSQL, is the machine's own.
        stack.compose("up", "-d", "--no-build", "ray-head")
        wait_for(lambda: stack.health("ray-head") == "healthy", timeout=600, interval=3, what="a healthy Ray head")
        stack.compose("up", "-d", "--no-build", "trainer-worker", "quantum-worker-aer")
        stack.compose("up", "-d", "--no-build", "--no-deps", "api")
        wait_for(
            lambda: all(stack.health(s) == "healthy" for s in STACK), timeout=600, interval=3, what="healthy services"
        )
        dash = f"http://127.0.0.1:{stack.ports['QPEFT_RAY_DASHBOARD_PORT']}"
        alive = wait_for(
            lambda: (
                (n := [n for n in list_nodes(address=dash, detail=True) if n.state == "ALIVE"]) and len(n) == 3 and n
            ),
            timeout=300,
            interval=2,
            what="three Ray nodes",
        )
        assert [n.resources_total.get("qpu") for n in alive].count(2.0) == 1

        max_steps = 8
        api = f"http://127.0.0.1:{stack.ports['QPEFT_API_PORT']}"
        with httpx.Client(base_url=api, timeout=30) as c:
            key, job = submit_tiny_qpa(c, ADMIN, max_steps, save_every=1)

            def status():
                return c.get(f"/v1/jobs/{job['id']}", headers=key).json()

            # the circuits run in the quantum-worker container, nowhere else
            wait_for(
                lambda: (j := status())["state"] == "RUNNING" and j["step"] >= 1,
                timeout=900,
                interval=1,
                what="the job's first step",
            )
            assert any("ray::QuantumWorker" in p for p in stack.processes("quantum-worker-aer"))
            assert not any("ray::QuantumWorker" in p for p in stack.processes("trainer-worker"))
            # and in Ray's view on the qpu node (now: a node Docker restarted comes back under a new id)
            nodes = list_nodes(address=dash, detail=True)
            qpu_nodes = {n.node_id for n in nodes if n.state == "ALIVE" and n.resources_total.get("qpu")}
            workers = list_actors(address=dash, filters=[("class_name", "=", "QuantumWorker")], detail=True)
            on = {w.node_id for w in workers if w.state == "ALIVE"}
            assert len(qpu_nodes) == 1 and on == qpu_nodes, (qpu_nodes, workers)

            killed_at = status()
            assert killed_at["state"] == "RUNNING" and killed_at["step"] < max_steps - 3, killed_at
            stack.crash("quantum-worker-aer")
            # then the job's driver (the Ray job entrypoint, in the head's container), two steps later: the
            # control plane must resubmit it from its last checkpoint as attempt 2
            wait_for(lambda: status()["step"] >= killed_at["step"] + 2, timeout=900, interval=1, what="two more steps")
            driver_killed_at = status()
            assert driver_killed_at["state"] == "RUNNING" and driver_killed_at["step"] < max_steps, driver_killed_at
            stack.kill_process("ray-head", f"/var/lib/qpeft/jobs/{job['id']}/spec.json")
            final = wait_for(
                lambda: (j := status())["state"] not in ("QUEUED", "RUNNING") and j,
                timeout=900,
                interval=2,
                what="the job after the quantum worker died",
            )
            assert final["state"] == "SUCCEEDED", f"{final['reason']}\n{stack.logs()}"
            assert (final["step"], final["attempt"]) == (max_steps, 2)
            lines = [x["line"] for x in c.get(f"/v1/jobs/{job['id']}/logs?tail=1000", headers=key).json()["lines"]]
            resumed = [int(x.rsplit(" ", 1)[1]) for x in lines if "resumed from the checkpoint of step" in x]
            assert resumed and min(resumed) >= killed_at["step"], lines  # from a checkpoint, not from step 0
            # the container came back (restart: unless-stopped) and the pool's actors with it
            restarts = run("docker", "inspect", "-f", "{{.RestartCount}}", stack.container("quantum-worker-aer"))
            assert int(restarts.stdout) >= 1

        rows = ledger_rows(pg_schema, job["id"])
        shots = final["shots"]
        print(
            f"quantum worker killed at step {killed_at['step']}, driver at step {driver_killed_at['step']}; "
            f"shots {shots}; reservations {rows}"
        )
        # every reservation settled; the job's counters are the pool's ledger rows, the dead attempt's open
        # ones charged as lost, and the steps redone after the resume cost their shots again
        assert "open" not in rows and shots["reserved"] == 0
        assert shots["spent"] == sum(rows.get("committed", [])) >= job["shots"]["forecast"] > 0
        assert shots["lost"] == sum(rows.get("released", []))
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.down()
        assert stack.leftovers() == []
