"""deploy/slurm/qpeft.sbatch under a fake Slurm on this one machine: `scontrol show hostnames` names two
"nodes" and `srun --nodelist=<node> cmd` runs cmd here, so the script's own logic (roles per node,
ports from the job id, Ray token auth, the control plane, shutdown on SIGTERM) runs unchanged. The
cluster must show the head with the allocation's CPUs and the quantum node with its `qpu` slots, take a
job through the API, and be gone after the SIGTERM Slurm sends at the end of the allocation.

The job uses the control plane's stand-in trainer (tests/control_plane_standin_trainer.py): the real
trainer on the `qpu` node is exercised through docker-compose.yml in tests/test_deploy_compose.py.
The script must also be shellcheck clean (`make test` installs shellcheck).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_control_plane_support import SPEC, STANDIN, wait_for

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "deploy" / "slurm" / "qpeft.sbatch"

SRUN = """#!/bin/bash
# fake srun: options first (always --opt=value in the script), then the command, run on this machine
node=""
while [[ $# -gt 0 && $1 == --* ]]; do
  [[ $1 == --nodelist=* ]] && node=${1#--nodelist=}
  shift
done
echo "$node $*" >>"$FAKE_SLURM_DIR/srun.log"
SLURMD_NODENAME=$node exec "$@"
"""
SCONTROL = """#!/bin/bash
[[ $1 == show && $2 == hostnames ]] || exit 1
printf '%s\\n' $FAKE_SLURM_NODES
"""


def test_shellcheck_clean():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck not installed (make test installs it)")
    r = subprocess.run(["shellcheck", "--severity=info", str(SBATCH)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_job_id() -> int:
    """A job id whose derived ports (20000 + (id % 400) * 100 + 0..3) are all free here."""
    while True:
        job = random.randrange(10_000, 10_000_000)
        base = 20000 + (job % 400) * 100
        if all(_port_free(base + k) for k in range(4)):
            return job


def read_connection_file(conn: Path) -> dict[str, str]:
    """The script's connection details: it holds the admin key and the Ray token, so it must be 0600."""
    assert conn.stat().st_mode & 0o077 == 0
    return dict(line.split("=", 1) for line in conn.read_text().splitlines())


def ray_nodes(info: dict[str, str], count: int = 2) -> list[dict]:
    """The cluster's ALIVE Ray nodes once there are `count`, read from the state API over HTTP with the job's token
    (this process's Ray client is set up for auth mode 'disabled'); a request without the token is refused."""
    import httpx

    bearer = {"Authorization": f"Bearer {info['RAY_AUTH_TOKEN']}"}

    def alive():
        try:
            r = httpx.get(f"{info['RAY_ADDRESS']}/api/v0/nodes", params={"detail": 1}, headers=bearer, timeout=30)
        except httpx.TransportError:  # the dashboard comes up a little after the GCS
            return None
        found = [n for n in r.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]
        return found if len(found) == count else None

    nodes = wait_for(alive, timeout=120, interval=2, what="the quantum node to join")
    assert httpx.get(f"{info['RAY_ADDRESS']}/api/v0/nodes", timeout=30).status_code == 401
    return nodes


def new_tenant_when_ready(c, info: dict[str, str]) -> dict[str, str]:
    """Wait until the API is ready (it reaches Ray's job server with the job's token), then make a tenant."""
    import httpx

    def serving():
        try:
            return c.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    wait_for(serving, timeout=120, what="the API")
    r = c.post("/v1/tenants", json={"name": "hpc", "shots": 10**6}, headers={"X-API-Key": info["QPEFT_ADMIN_KEY"]})
    assert r.status_code == 201, r.text
    return {"X-API-Key": r.json()["api_key"]}


def finished_job(c, key: dict[str, str], job_id: str, timeout: float) -> dict:
    def finished():
        j = c.get(f"/v1/jobs/{job_id}", headers=key).json()
        return j if j["state"] not in ("QUEUED", "RUNNING") else None

    return wait_for(finished, timeout=timeout, interval=1, what="the job")


def _ours(tmp: str):
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(tmp in part for part in proc.info["cmdline"] or []):
                yield proc


@pytest.mark.slow
def test_sbatch_brings_up_a_cluster_and_runs_a_job(tmp_path):
    import httpx

    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    job = free_job_id()
    data = tmp_path / "data"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "QPEFT_", "SLURM_"))}
    env = {
        **base,
        "PATH": f"{fake}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{base['PATH']}",
        "FAKE_SLURM_DIR": str(tmp_path),
        "FAKE_SLURM_NODES": "node-a node-b",
        "SLURM_JOB_ID": str(job),
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_CPUS_ON_NODE": "2",
        "QPEFT_DATA_DIR": str(data),
        "QPEFT_QPU_NODES": "1",
        "QPEFT_QPU_SLOTS": "2",
        "QPEFT_TRAINER_COMMAND": f"{{python}} {STANDIN}",
        "QPEFT_TRAINER_PYTHON": sys.executable,
    }
    ray_tmp = f"/tmp/qpeft-{job}"
    log = open(tmp_path / "sbatch.log", "w")  # noqa: SIM115 - kept open for the script's life
    script = subprocess.Popen(["bash", str(SBATCH)], env=env, stdout=log, stderr=log, start_new_session=True)

    def logs() -> str:
        return (tmp_path / "sbatch.log").read_text()[-4000:]

    try:
        conn = data / f"cluster-{job}.env"
        wait_for(lambda: conn.exists() or script.poll() is not None, timeout=300, interval=1, what="the cluster")
        assert script.poll() is None, logs()
        info = read_connection_file(conn)
        assert info["RAY_AUTH_TOKEN"] and info["QPEFT_URL"].endswith(f":{20000 + (job % 400) * 100 + 3}")
        nodes = ray_nodes(info)
        resources = sorted((n["resources_total"].get("CPU", 0), n["resources_total"].get("qpu", 0)) for n in nodes)
        assert resources == [(0, 2.0), (2.0, 0)], resources  # the quantum node, the head (the allocation's CPUs)
        placed = (tmp_path / "srun.log").read_text()
        assert "node-a ray start --head" in placed and "node-b ray start --address=" in placed
        assert "node-a qpeft serve" in placed

        with httpx.Client(base_url=info["QPEFT_URL"], timeout=30) as c:
            key = new_tenant_when_ready(c, info)
            job_id = c.post("/v1/jobs", json={**SPEC, "max_steps": 3}, headers=key).json()["id"]
            j = finished_job(c, key, job_id, timeout=180)
            assert (j["state"], j["step"], j["shots"]["spent"]) == ("SUCCEEDED", 3, 900), (j, logs())

        # the end of the allocation: Slurm signals the batch shell, which must take every node down
        script.send_signal(signal.SIGTERM)
        script.wait(90)
        wait_for(lambda: not list(_ours(ray_tmp)), timeout=60, what="Ray's processes to exit")
        assert not conn.exists() and "stopping the control plane" in logs()
        assert _port_free(int(info["QPEFT_URL"].rsplit(":", 1)[1]))
    except BaseException:
        print(logs())  # pytest shows it with the failure
        raise
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(script.pid, signal.SIGKILL)
        for proc in _ours(ray_tmp):
            proc.kill()
        time.sleep(0.5)
        shutil.rmtree(ray_tmp, ignore_errors=True)
