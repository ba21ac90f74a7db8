"""A real two-node Slurm cluster on this one machine, for tests/test_deploy_slurm_real.py (no tests here).

munged (as user munge), one slurmctld and two slurmd daemons (`-N n1`, `-N n2`), all on 127.0.0.1, each
started in the foreground by this process and stopped by its PID. Everything they write (config, munge key,
socket, spool, state, logs, pid files) lives in one temporary folder removed at the end; clients find the
cluster through SLURM_CONF in `env`. Needs root (munged runs as munge, slurmd as root) and Debian's
`slurm-wlm` and `munge`.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scancel", "sinfo", "squeue", "scontrol")
NODES = ("n1", "n2")


def why_not() -> str | None:
    """Why a real Slurm cannot run here, or None."""
    if os.geteuid() != 0:
        return "the Slurm daemons need root (munged as user munge, slurmd as root)"
    missing = [d for d in DAEMONS if not shutil.which(d)]
    if missing:
        return f"not installed: {', '.join(missing)} (`make slurm-tools` installs Debian's slurm-wlm and munge)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no user 'munge' (Debian's munge package creates it)"
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def slurm_conf(d: Path, cpus: int, first_job_id: int) -> str:
    ctld, *node_ports = _free_ports(1 + len(NODES))
    host = socket.gethostname()
    lines = [
        "ClusterName=qpeft-test",
        f"FirstJobId={first_job_id}",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={d / 'munge' / 'munge.socket'}",
        "SlurmUser=root",
        "MpiDefault=none",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "ReturnToService=2",
        "KillWait=30",
        "JobCompType=jobcomp/none",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        f"StateSaveLocation={d / 'state'}",
        f"SlurmctldPidFile={d / 'slurmctld.pid'}",
        f"SlurmctldLogFile={d / 'slurmctld.log'}",
        # one pid file, spool and log per node: a shared pid file makes the second slurmd stop the first
        f"SlurmdPidFile={d / 'slurmd.%n.pid'}",
        f"SlurmdSpoolDir={d / 'spool' / '%n'}",
        f"SlurmdLogFile={d / 'slurmd.%n.log'}",
    ]
    for name, port in zip(NODES, node_ports, strict=True):
        lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} State=UNKNOWN")
    lines.append(f"PartitionName=test Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


class SlurmCluster:
    """`with SlurmCluster() as slurm:` a two-node cluster; `slurm.env` for sbatch/srun/scancel/squeue."""

    def __init__(self, cpus: int = 2, first_job_id: int = 1):
        self.cpus = cpus
        self.dir = Path(tempfile.mkdtemp(prefix="qpeft-slurm-"))
        self.procs: list[subprocess.Popen] = []
        conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(conf)}
        for sub in ("state", "spool/n1", "spool/n2"):
            (self.dir / sub).mkdir(parents=True)
        conf.write_text(slurm_conf(self.dir, cpus, first_job_id))

    def _munge(self) -> None:
        # munged refuses a key that anyone but its owner can read, and a socket folder that others cannot enter
        munge = pwd.getpwnam("munge")
        m = self.dir / "munge"
        m.mkdir()
        m.chmod(0o755)
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for p in (m, key):
            os.chown(p, munge.pw_uid, munge.pw_gid)
        self.dir.chmod(0o755)  # munged, as user munge, must reach its folder
        cmd = ["munged", "--foreground", f"--key-file={key}", f"--socket={m / 'munge.socket'}"]
        cmd += [f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'seed'}"]
        self._start(cmd, user=munge)
        self._wait(lambda: (m / "munge.socket").exists(), "munged", m / "munged.log")

    def _start(self, cmd: list[str], user=None) -> subprocess.Popen:
        kw = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
        log = open(self.dir / f"{Path(cmd[0]).name}-{len(self.procs)}.out", "wb")  # noqa: SIM115
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=log, start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def _wait(self, ready, what: str, log: Path, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while not ready():
            dead = [p for p in self.procs if p.poll() is not None]
            if dead or time.time() > deadline:
                text = log.read_text()[-3000:] if log.exists() else "(no log)"
                raise RuntimeError(f"{what} did not start ({dead and dead[0].args[0]} exited): {text}")
            time.sleep(0.3)

    def sinfo_idle(self) -> bool:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
        states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
        return r.returncode == 0 and all(states.get(n) == "idle" for n in NODES)

    def __enter__(self) -> SlurmCluster:
        try:
            self._munge()
            self._start(["slurmctld", "-D", "-i"])
            for node in NODES:
                self._start(["slurmd", "-D", "-N", node])
            self._wait(self.sinfo_idle, "the two slurmd nodes", self.dir / "slurmctld.log", timeout=90)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.dir.glob("*.log")))

    def stop(self) -> None:
        """Every daemon this object started, newest first, by its PID; then the folder."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
