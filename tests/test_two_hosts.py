"""Two hosts for real: a Ray head in one network namespace, a worker node holding the `qpu` resource in
another, joined by a veth pair. The trainer entry point runs as a driver on the head's host; the quantum
workers must run on the second host, and the job must still finish.

Needs root (ip netns); skipped with the reason where the sandbox refuses. Everything it starts (ray
processes in the namespaces, the namespaces, the veth pair) is removed afterwards, also on failure.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from services.contract import events
from services.contract.jobspec import JobSpec

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
PORT = 29811  # inside our own namespaces: nothing else listens there (and never 6379, Redis's)


def sh(*cmd, check=True):
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


class Hosts:
    """Two namespaces `head` and `qpu` joined by a veth pair, 10.231.<k>.1 and 10.231.<k>.2."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        k = int(tag, 16) % 250 + 1
        self.ns = {"head": f"qpeft-head-{tag}", "qpu": f"qpeft-qpu-{tag}"}
        self.ip = {"head": f"10.231.{k}.1", "qpu": f"10.231.{k}.2"}
        self.veth = {"head": f"qh{tag}", "qpu": f"qq{tag}"}
        self.tmp = Path(tempfile.mkdtemp(prefix="qp2h-"))  # short: Ray's socket paths must fit 107 bytes
        self.procs: list[subprocess.Popen] = []
        self.made: list[str] = []

    def up(self):
        for ns in self.ns.values():
            sh("ip", "netns", "add", ns)
            self.made.append(ns)
        sh("ip", "link", "add", self.veth["head"], "type", "veth", "peer", "name", self.veth["qpu"])
        for side, ns in self.ns.items():
            dev = self.veth[side]
            sh("ip", "link", "set", dev, "netns", ns)
            sh("ip", "-n", ns, "addr", "add", f"{self.ip[side]}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def env(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "QPEFT_DATABASE"))}
        return {**env, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}

    def start(self, side: str, *args):
        log = open(self.tmp / f"{side}.log", "w")  # noqa: SIM115 - kept open for the process's life
        cmd = ["ip", "netns", "exec", self.ns[side], RAY, "start", "--block", "--disable-usage-stats", *args]
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=log, env=self.env(), start_new_session=True))

    def wait_port(self, side: str, port: int, timeout=120):
        probe = f"exec 3<>/dev/tcp/{self.ip[side]}/{port}"
        deadline = time.time() + timeout
        while sh("ip", "netns", "exec", self.ns[side], "bash", "-c", probe, check=False).returncode:
            if time.time() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"ray on {side} did not come up: {self.logs()}")
            time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in self.tmp.glob("*.log"))

    def down(self):
        for p in self.procs:  # `ray start --block` ends its node's processes on SIGTERM
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.time() + 10
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        for ns in self.made:  # whatever still runs inside our namespaces was started by this test
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", ns, check=False)  # takes its end of the veth pair, and so the pair
        sh("rm", "-rf", str(self.tmp), check=False)


@pytest.fixture
def hosts():
    if os.geteuid() != 0:
        pytest.skip("needs root for ip netns (network namespaces)")
    h = Hosts()
    try:
        h.up()
    except (OSError, subprocess.CalledProcessError) as e:
        h.down()
        msg = getattr(e, "stderr", "") or str(e)
        pytest.skip(f"the sandbox refuses network namespaces / veth pairs: {msg.strip()}")
    try:
        yield h
    finally:
        h.down()


def test_quantum_workers_run_on_the_second_host(hosts, tmp_path):
    h = hosts
    h.start(
        "head",
        "--head",
        f"--port={PORT}",
        f"--node-ip-address={h.ip['head']}",
        "--num-cpus=2",
        "--include-dashboard=false",
        f"--temp-dir={h.tmp / 'head'}",
    )
    h.wait_port("head", PORT)
    h.start(
        "qpu",
        f"--address={h.ip['head']}:{PORT}",
        f"--node-ip-address={h.ip['qpu']}",
        "--num-cpus=0",
        '--resources={"qpu": 2}',
    )

    data = tmp_path / "train.txt"
    data.write_text("\n".join(f"line {i} of a small corpus for two hosts and one qpu node" for i in range(120)))
    spec = JobSpec.model_validate(
        {
            "base_model": "tiny-gpt2",
            "dataset": {"train": str(data), "max_length": 32, "eval_limit": 8},
            "method": "qpa",
            "method_config": {"r": 2, "n_mlp": 64, "qnn_depth": 2, "mapping_widths": [16, 16]},
            # exact circuits on the pool ("auto" would pick autograd, in the trainer's own process)
            "gradient": "parameter_shift",
            "max_steps": 2,
            "training": {"batch_size": 4, "eval_max_batches": 1},
        }
    )
    env = {**h.env(), "RAY_ADDRESS": f"{h.ip['head']}:{PORT}", "QPEFT_ARTIFACT_DIR": str(tmp_path / "art")}
    proc = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            h.ns["head"],
            sys.executable,
            "-m",
            "services.trainer",
            "--spec",
            str(spec.dump(tmp_path / "job.json")),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    evs = [e for e in map(events.parse, proc.stdout.splitlines()) if e]
    assert proc.returncode == 0 and evs and evs[-1]["state"] == "SUCCEEDED", (
        proc.stdout[-3000:] + proc.stderr[-3000:] + h.logs()
    )
    placed = [e["placement"] for e in evs if e["type"] == "log" and e.get("placement")]
    assert placed, json.dumps(evs)[:3000]
    # both quantum workers on the second host, none on the head's
    assert [w["ip"] for w in placed[0]] == [h.ip["qpu"]] * 2
    assert [e["step"] for e in evs if e["type"] == "progress"] == [1, 2]
