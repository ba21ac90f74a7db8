"""deploy/slurm/qpeft.sbatch on a real Slurm: munged, slurmctld and two slurmd nodes on this machine
(tests/slurm_support.py), the script submitted with `sbatch -N2` exactly as an HPC user does.

What tests/test_deploy_slurm.py checks under its fake srun/scontrol, here against the real thing: the Ray
head on the first node and the quantum worker with its `qpu` slots on the last (each process's Slurm node as
slurmstepd set it), Ray token auth, the control plane's `/readyz`, and a QPA job on Aer through the API, run
by the real trainer, whose shots equal the forecast and whose circuits ran on the quantum node. Then
`scancel`, and the script's trap must leave no process of the Slurm job behind.

Needs root and Debian's slurm-wlm and munge (`make slurm-tools` installs them); skipped otherwise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_support import SlurmCluster, why_not
from tests.test_control_plane_support import SPEC, wait_for
from tests.test_deploy_slurm import finished_job, free_job_id, new_tenant_when_ready, ray_nodes, read_connection_file

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "deploy" / "slurm" / "qpeft.sbatch"


def job_processes(job: int):
    """Every process that slurmstepd started for the Slurm job (they carry its id in their environment)."""
    import psutil

    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("SLURM_JOB_ID") == str(job):
                yield proc


def node_of(proc) -> str:
    return proc.environ().get("SLURMD_NODENAME", "?")


@pytest.mark.slow
def test_sbatch_on_a_real_slurm(tmp_path, shared_data):
    import httpx

    if reason := why_not():
        pytest.skip(reason)
    job = free_job_id()  # its derived ports are free; slurmctld hands it out as the first job id
    data = tmp_path / "data"
    ray_tmp = f"/tmp/qpeft-{job}"
    with SlurmCluster(cpus=2, first_job_id=job) as slurm:
        base = {k: v for k, v in slurm.env.items() if not k.startswith(("RAY_", "QPEFT_", "SLURM_"))}
        env = {
            **base,
            "SLURM_CONF": slurm.env["SLURM_CONF"],
            "QPEFT_VENV": sys.prefix,  # the script activates it on every node
            "QPEFT_DATA_DIR": str(data),
            "QPEFT_SHARED_DATA": str(shared_data),
            "QPEFT_QPU_NODES": "1",
            "QPEFT_QPU_SLOTS": "2",
        }
        out = tmp_path / f"qpeft-{job}.out"

        def logs() -> str:
            return (out.read_text()[-4000:] if out.exists() else "(no output yet)") + "\n" + slurm.logs()

        started = time.time()
        # CPU-only nodes: the script asks for a GPU per node by default
        cmd = ["sbatch", "--parsable", "-N2", "--gpus-per-node=0", f"--output={out}", f"--chdir={tmp_path}"]
        r = subprocess.run([*cmd, str(SBATCH)], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == str(job), r.stdout + r.stderr

        def state() -> str:
            q = subprocess.run(["squeue", "-h", "-j", str(job), "-o", "%T"], env=env, capture_output=True, text=True)
            return q.stdout.strip()

        try:
            conn = data / f"cluster-{job}.env"
            wait_for(lambda: conn.exists() or state() not in ("PENDING", "RUNNING"), 300, 1, "the cluster")
            assert state() == "RUNNING", logs()
            info = read_connection_file(conn)
            assert info["RAY_AUTH_TOKEN"] and info["RAY_ADDRESS"].startswith("http://127.0.0.1:")
            assert info["QPEFT_URL"] == f"http://127.0.0.1:{20000 + (job % 400) * 100 + 3}"  # Slurm's NodeAddr
            bearer = {"Authorization": f"Bearer {info['RAY_AUTH_TOKEN']}"}
            nodes = ray_nodes(info)
            by_role = {("qpu" if n["resources_total"].get("qpu") else "head"): n for n in nodes}
            assert by_role["head"]["resources_total"].get("CPU") == 2.0  # the allocation's CPUs on the node
            assert (
                by_role["qpu"]["resources_total"].get("CPU", 0) == 0 and by_role["qpu"]["resources_total"]["qpu"] == 2
            )

            # where slurmd ran each step: the head and the API on the first node, the quantum worker on the last
            placed = {}
            for proc in job_processes(job):
                with contextlib.suppress(Exception):
                    cmdline = " ".join(proc.cmdline())
                    if "ray start --head" in cmdline:
                        placed["head"] = node_of(proc)
                    elif "ray start --address" in cmdline and "qpu" in cmdline:
                        placed["qpu"] = node_of(proc)
                    elif "qpeft serve" in cmdline:
                        placed["api"] = node_of(proc)
            assert placed == {"head": "n1", "qpu": "n2", "api": "n1"}, placed

            with httpx.Client(base_url=info["QPEFT_URL"], timeout=30) as c:
                key = new_tenant_when_ready(c, info)
                spec = {
                    **SPEC,
                    "max_steps": 3,
                    "shots": 64,
                    "dataset": {"train": "tinyshakespeare", "limit": 200, "max_length": 32},
                }
                submitted = c.post("/v1/jobs", json=spec, headers=key).json()
                j = finished_job(c, key, submitted["id"], timeout=400)
                assert j["state"] == "SUCCEEDED", (j["reason"], logs())
                assert j["step"] == 3 and j["shots"]["spent"] == submitted["shots"]["forecast"] == 3 * 17 * 64
                assert j["shots"]["reserved"] == 0

            # the circuits ran in quantum worker actors on the quantum node
            r = httpx.get(f"{info['RAY_ADDRESS']}/api/v0/actors", params={"detail": 1, "limit": 1000}, headers=bearer)
            workers = [a for a in r.json()["data"]["result"]["result"] if a["class_name"] == "QuantumWorker"]
            assert workers and {a["node_id"] for a in workers} == {by_role["qpu"]["node_id"]}
            print(f"real Slurm: cluster and QPA job in {time.time() - started:.0f} s")

            # cancel as a user does: Slurm signals the batch shell and every step; the trap stops them in order
            cancelled = time.time()
            subprocess.run(["scancel", str(job)], env=env, check=True, timeout=30)
            wait_for(lambda: not state(), timeout=120, interval=1, what="Slurm to end the job")
            wait_for(lambda: not list(job_processes(job)), timeout=60, what="the job's processes to exit")
            assert not conn.exists() and "stopping the control plane" in out.read_text(), logs()
            print(f"real Slurm: scancel to nothing left in {time.time() - cancelled:.0f} s")
        except BaseException:
            print(logs())
            raise
        finally:
            subprocess.run(["scancel", str(job)], env=env, capture_output=True, timeout=30)
            for proc in job_processes(job):  # only on failure: whatever the job left
                with contextlib.suppress(Exception):
                    os.kill(proc.pid, signal.SIGKILL)
            shutil.rmtree(ray_tmp, ignore_errors=True)
