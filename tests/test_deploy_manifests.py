"""The deployment files checked without Docker or Kubernetes: docker-compose.yml's structure (services,
dependency order, health checks, images built from deploy/docker/Dockerfile, no credentials, commands
that exist), the Dockerfile, and the Kubernetes manifests (built-in kinds against the Kubernetes
OpenAPI schemas through kubernetes-validate when installed, the KubeRay RayCluster structurally)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_deploy_compose import _expand, env_files, load_compose, start_order
from tests.test_deploy_docker import RESET, load_host_override

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))
RAY_NODES = ["ray-head", "trainer-worker", "quantum-worker-aer", "quantum-worker-ibm"]
AGENT_PORTS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)
# a credential-looking assignment whose value is not an obvious placeholder
SECRET = re.compile(r"(TOKEN|PASSWORD|API_KEY|ADMIN_KEY|PEPPER|SECRET)\w*[ \t]*[:=][ \t]*(?!\$\{)(\S+)", re.I)
PLACEHOLDER = re.compile(r"change-me|your-|^[\"']?$")


def flag(command: list[str], name: str) -> str | None:
    return next((c.split("=", 1)[1] for c in command if c.startswith(f"--{name}=")), None)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


def test_compose_services_and_order(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "api", *RAY_NODES}
    order = start_order(services, list(services))
    assert order.index("postgres") < order.index("api") and order.index("ray-head") < order.index("api")
    for name in RAY_NODES[1:]:
        assert services[name]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    for name, service in services.items():
        assert "healthcheck" in service, name
        for dep, cond in (service.get("depends_on") or {}).items():
            assert cond["condition"] in ("service_healthy", "service_started"), (name, dep)
    assert services["quantum-worker-ibm"]["profiles"] == ["ibm"]
    assert all("profiles" not in services[n] for n in services if n != "quantum-worker-ibm")


def test_compose_images_and_runtime(compose):
    for name in ["api", *RAY_NODES]:
        s = compose["services"][name]
        assert s["build"] == {"context": ".", "dockerfile": "deploy/docker/Dockerfile"}, name
        assert s["init"] is True, name  # Ray's processes must be reaped
        assert any(v.endswith(":/var/lib/qpeft") for v in s["volumes"]), name  # the storage jobs share
    for name in RAY_NODES:
        assert compose["services"][name]["shm_size"], name
    for name, s in compose["services"].items():  # published only on the host's loopback
        assert all(p.startswith("127.0.0.1:") for p in s.get("ports") or []), name


def test_compose_worker_groups_offer_qpu(compose):
    import json

    services = compose["services"]
    head = services["ray-head"]["command"]
    assert head[:3] == ["ray", "start", "--head"] and flag(head, "num-cpus") == "0"
    for name, executor in (("quantum-worker-aer", "qpu_aer"), ("quantum-worker-ibm", "qpu_ibm")):
        cmd = services[name]["command"]
        resources = json.loads(flag(cmd, "resources"))
        assert resources["qpu"] >= 1 and resources[executor] == resources["qpu"], name
        assert flag(cmd, "num-cpus") == "0" and flag(cmd, "address") == "ray-head:6379", name
    assert "qpu" not in " ".join(services["trainer-worker"]["command"])
    api = services["api"]
    assert api["environment"]["QPEFT_RAY_ADDRESS"] == f"http://ray-head:{flag(head, 'dashboard-port')}"


def test_compose_host_network_variant(compose):
    """deploy/docker/compose.host.yml (what tests/test_deploy_docker.py runs): every service on the host's
    network, each command the base file's with only the host-network changes: the head at 127.0.0.1, and the
    Ray dashboard with its Jobs API (issue 14), the API and PostgreSQL listening on 127.0.0.1 only."""
    host = _expand(load_host_override(), {})
    assert set(host["services"]) == set(compose["services"])
    for name, service in compose["services"].items():  # ports cannot be published on the host's network
        assert "ports" not in service or host["services"][name]["ports"] is RESET, name
    loopback = {
        "--address=ray-head:6379": "--address=127.0.0.1:6379",
        "--dashboard-host=0.0.0.0": "--dashboard-host=127.0.0.1",
        "0.0.0.0": "127.0.0.1",  # the API's --host
    }
    agent_ports = []
    for name, override in host["services"].items():
        assert override["network_mode"] == "host", name
        cmd = override["command"]
        assert "0.0.0.0" not in " ".join(cmd), name
        if name == "postgres":
            assert "listen_addresses=127.0.0.1" in cmd
            continue
        base = [loopback.get(c, c) for c in compose["services"][name]["command"]]
        if cmd[0] == "ray":  # the agents' ports fixed, one set per node, instead of chosen by Ray
            agents = {f: flag(cmd, f) for f in AGENT_PORTS}
            assert all(agents.values()), (name, agents)
            agent_ports.append(set(agents.values()))
            cmd = [c for c in cmd if c.split("=")[0][2:] not in AGENT_PORTS]
            base.remove("--dashboard-agent-listen-port=0")
        assert cmd == base, name
    assert len(set().union(*agent_ports)) == 4 * len(agent_ports)  # no two nodes on the host collide
    assert host["services"]["api"]["environment"]["QPEFT_RAY_ADDRESS"] == "http://127.0.0.1:8265"


def test_compose_commands_exist(compose):
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    from typer.main import get_command

    from services.cli import app

    assert scripts["qpeft"] == "services.cli:app"
    for name, s in compose["services"].items():
        if name == "postgres":
            continue
        cmd = s["command"]
        assert cmd[0] in ("ray", "qpeft"), name
        assert shutil.which(cmd[0], path=str(Path(sys.executable).parent)), cmd[0]
        if cmd[0] == "qpeft":
            assert cmd[1] in get_command(app).commands, cmd
        test = s["healthcheck"]["test"]
        assert test[0] == "CMD" and test[1] in ("ray", "python", "pg_isready"), (name, test)


def test_no_credentials_committed(compose):
    for path in [ROOT / "docker-compose.yml", DEPLOY / "compose.env", DEPLOY / "docker" / "Dockerfile", *K8S]:
        for m in SECRET.finditer(path.read_text()):
            assert PLACEHOLDER.search(m[2]), f"{path.name}: {m[0]}"
    for path in DEPLOY.glob("*.example"):
        for m in SECRET.finditer(path.read_text()):
            assert PLACEHOLDER.search(m[2]), f"{path.name}: {m[0]}"
    # real credential files are git-ignored and kept out of the image's build context
    ignored = subprocess.run(
        ["git", "check-ignore", "deploy/secrets.env", "deploy/db.env", "deploy/ibm.env", "deploy/k8s/secret.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert len(ignored.stdout.split()) == 4, ignored.stdout + ignored.stderr
    assert "deploy/*.env" in (ROOT / ".dockerignore").read_text().split()
    # only the services that need them read the secret env files
    readers = {
        name: [p.name for p, _ in env_files(s) if p.name in ("secrets.env", "db.env", "ibm.env")]
        for name, s in compose["services"].items()
    }
    ray_nodes = ("ray-head", "trainer-worker", "quantum-worker-aer")
    assert {n: r for n, r in readers.items() if r} == {
        "postgres": ["secrets.env"],
        "api": ["secrets.env"],
        **{n: ["db.env"] for n in ray_nodes},
        "quantum-worker-ibm": ["db.env", "ibm.env"],
    }
    example = (DEPLOY / "secrets.env.example").read_text()
    assert all(f"\n{k}=" in f"\n{example}" for k in ("POSTGRES_PASSWORD", "QPEFT_DATABASE_URL", "QPEFT_ADMIN_KEY"))


def test_dockerfile():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert lines[0].startswith("ARG PYTHON_IMAGE=python:3.11") and any(x.startswith("FROM ") for x in lines)
    assert 'ENTRYPOINT ["tini", "--"]' in lines
    for line in lines:
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), line
        assert not re.match(r"(ENV|ARG)\s+\S*(TOKEN|PASSWORD|SECRET|KEY)", line, re.I), line
    assert "TORCH_INDEX" in text and "USER qpeft" in lines
    # the locked dependencies are installed before the code is copied in, so a code change reuses their layers
    deps = next(i for i, x in enumerate(lines) if "-r /tmp/deps.txt" in x)
    assert deps < lines.index("COPY qpeft_core qpeft_core") < lines.index("COPY services services")
    assert lines.index("COPY services services") < lines.index("RUN pip install --no-deps --no-build-isolation -e .")


def k8s_docs() -> list[dict]:
    return [d for path in K8S for d in yaml.safe_load_all(path.read_text()) if d]


def test_k8s_builtin_kinds_validate():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (make test installs it)")
    docs = [d for d in k8s_docs() if d["apiVersion"] != "ray.io/v1"]
    assert {d["kind"] for d in docs} >= {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Secret", "Deployment"}
    for d in docs:
        kv.validate(d, kv.latest_version(), strict=True)


def test_k8s_raycluster_and_api_fit_together():
    docs = k8s_docs()
    by_kind = {}
    for d in docs:
        assert d["metadata"].get("namespace", "qpeft") == "qpeft" and not (d["kind"] == "Secret" and "data" in d)
        by_kind.setdefault(d["kind"], []).append(d)
    (cluster,) = by_kind["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"trainer", "quantum-aer", "quantum-ibm"}
    for name in ("quantum-aer", "quantum-ibm"):
        params = groups[name]["rayStartParams"]
        resources = yaml.safe_load(yaml.safe_load(params["resources"]))  # KubeRay's quoted JSON
        assert resources["qpu"] >= 1 and params["num-cpus"] == "0", name
    assert groups["trainer"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1

    secrets = {s["metadata"]["name"] for s in by_kind["Secret"]}
    configs = {c["metadata"]["name"] for c in by_kind["ConfigMap"]}
    claims = {c["metadata"]["name"] for c in by_kind["PersistentVolumeClaim"]}
    templates = [head["template"], *(g["template"] for g in groups.values())]
    (api,) = by_kind["Deployment"]
    templates.append(api["spec"]["template"])
    ibm_readers = []
    assert all(t["spec"]["shareProcessNamespace"] for t in templates[:-1])  # zombies reaped without tini
    for t in templates:
        for c in t["spec"]["containers"]:
            assert c["image"].startswith("qpeft:"), c["image"]  # built from deploy/docker/Dockerfile
            for src in c.get("envFrom", []):
                if "secretRef" in src:
                    assert src["secretRef"]["name"] in secrets
                    ibm_readers += [c["name"]] if src["secretRef"]["name"] == "qpeft-ibm" else []
                else:
                    assert src["configMapRef"]["name"] in configs
        for v in t["spec"].get("volumes", []):
            assert "persistentVolumeClaim" not in v or v["persistentVolumeClaim"]["claimName"] in claims
    assert ibm_readers == ["ray-worker"]  # the quantum-ibm group only

    env = {e["name"]: e["value"] for e in api["spec"]["template"]["spec"]["containers"][0]["env"]}
    host = re.match(r"http://([^.:]+)", env["QPEFT_RAY_ADDRESS"])[1]
    assert host == f"{cluster['metadata']['name']}-head-svc"  # the Service KubeRay creates for the head
    (service,) = by_kind["Service"]
    assert service["spec"]["selector"] == api["spec"]["template"]["metadata"]["labels"]
