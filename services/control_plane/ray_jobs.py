"""Jobs on Ray through the Ray Jobs API, and the loop that keeps the database in step with Ray.

The database is the source of truth for what was asked; Ray for what happened. The reconciler, a thread
started with the app, repeatedly, for every QUEUED or RUNNING job:
- submits it if Ray has not accepted it yet (submission id 'qpeft-<job id>', so a crash between submitting
  and recording it is harmless: Ray refuses the same id twice and the next pass finds it);
- reads Ray's status, then the job's log (everything after the lines already stored), so a job that ended
  while the control plane was down gets its events and final state on the next start;
- marks a job Ray no longer knows (cluster restarted, job deleted) FAILED with the reason;
- resubmits a job whose driver died (killed by a signal, or its node lost) without the trainer saying how
  it ended, up to QPEFT_MAX_ATTEMPTS submissions in all: the trainer resumes from its last checkpoint, the
  dead attempt's open shot reservations are charged as lost, and a log line records each attempt. A trainer
  that ends with an error of its own (a bad spec, a crash: a plain non-zero exit) is never resubmitted;
- forwards cancellation (stop_job) and, once a job is final, releases its open shot reservations as lost.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

from sqlalchemy import select
from sqlalchemy.engine import URL, make_url

from .events import final_state, ingest
from .models import ACTIVE_STATES, Job, JobLog, Reservation, now

log = logging.getLogger(__name__)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Ray's error types for a job whose supervisor actor (and so the driver with it) went away: its node died
SUPERVISOR_LOST = ("JOB_SUPERVISOR_ACTOR_DIED", "JOB_SUPERVISOR_ACTOR_UNKNOWN_FAILURE")
# a driver ended by these signals was killed (OOM killer, an operator, a node agent), not failed by itself
KILL_SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class RayStatus(NamedTuple):
    status: str
    message: str | None = None
    error_type: str | None = None
    exit_code: int | None = None  # the driver's exit code; negative: the signal that ended it

    def driver_killed(self) -> bool:
        """The driver died from outside: its node or supervisor was lost, or a signal ended it."""
        if self.status != "FAILED":
            return False
        if self.error_type in SUPERVISOR_LOST:
            return True
        code = self.exit_code
        # `sh -c` runs the entrypoint: a signal shows as -N (exec'ed) or 128 + N (the shell reports it)
        return code is not None and (-code in KILL_SIGNALS or code - 128 in KILL_SIGNALS)


class RayJobs:
    """A thin JobSubmissionClient wrapper; `address` is the job server (dashboard) URL."""

    def __init__(self, address: str):
        self.address = address
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.address)
        return self._client

    @property
    def dashboard_url(self) -> str:
        if self.address.startswith(("http://", "https://")):
            return self.address
        return getattr(self._client, "_address", None) or f"http://{self.address}"

    def reachable(self) -> bool:
        """A cheap probe of the job server (its version endpoint), never a job listing."""
        import requests

        try:
            # the client's headers carry the Ray auth token when token auth is on; its own get_version() would
            # do the same request but has no timeout
            headers = self.client._headers
            return requests.get(f"{self.dashboard_url}/api/version", headers=headers, timeout=3).ok
        except Exception:
            self._client = None
            return False

    def resources(self) -> dict[str, float]:
        """The alive nodes' total resources ({"CPU": 8.0, "GPU": 0.0, "qpu": 2.0, ...}) from Ray's state API
        on the job server; raises when it does not answer."""
        import requests

        url = f"{self.dashboard_url}/api/v0/nodes?limit=10000"
        body = requests.get(url, headers=self.client._headers, timeout=3).json()
        total: dict[str, float] = {}
        for node in body["data"]["result"]["result"]:
            if node.get("state") == "ALIVE":
                for name, amount in (node.get("resources_total") or {}).items():
                    total[name] = total.get(name, 0.0) + float(amount)
        return total

    def submit(self, submission_id: str, entrypoint: str, env: dict[str, str], metadata: dict[str, str]) -> None:
        try:
            self.client.submit_job(
                entrypoint=entrypoint,
                submission_id=submission_id,
                runtime_env={"env_vars": env},
                metadata=metadata,
            )
        except RuntimeError as e:
            if "already exists" not in str(e):
                raise

    def status(self, submission_id: str) -> RayStatus | None:
        """Ray's status of the job, or None when Ray has no such job."""
        try:
            info = self.client.get_job_info(submission_id)
        except RuntimeError as e:
            if "404" in str(e) or "does not exist" in str(e):
                return None
            raise
        error_type = getattr(info.error_type, "value", info.error_type)
        return RayStatus(
            str(getattr(info.status, "value", info.status)), info.message, error_type, info.driver_exit_code
        )

    def logs(self, submission_id: str) -> str:
        return self.client.get_job_logs(submission_id)

    def stop(self, submission_id: str) -> None:
        self.client.stop_job(submission_id)


def job_database_url(url: str) -> str:
    """The database URL a job gets, without its password: Ray shows a job's runtime_env to anyone who can
    open its dashboard. Jobs take the password from PGPASSWORD on their nodes (libpq reads it), which the
    embedded head gets from the control plane and deploy/ sets on cluster nodes."""
    u = make_url(url)  # URL.set(password=None) keeps the password (None means "unchanged" there)
    u = URL.create(u.drivername, u.username, None, u.host, u.port, u.database, u.query)
    return u.render_as_string(hide_password=False)


def database_password(url: str) -> str | None:
    return make_url(url).password


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 now (the OS picks them). All n sockets stay bound until every port
    is picked: one at a time, the OS may hand out a port it just released again (seen: a Ray head refusing
    to start because two of its components got the same port)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def free_port() -> int:
    return free_ports(1)[0]


def start_local_head(
    data_dir: Path, num_cpus: int | None = None, qpu_slots: int = 2, env: dict[str, str] | None = None
) -> str:
    """Embedded mode: reuse the local Ray head recorded in data_dir/ray.json, or start one. The head is
    `ray start --head --block` in its own session (process group), so running jobs outlive a restart of
    the control plane; `stop_local_head` ends it. GCS and the job server get free ports (6379 may belong
    to something else). Returns the job server URL."""
    state = data_dir / "ray.json"
    if state.exists():
        url = json.loads(state.read_text()).get("dashboard_url")
        if url and RayJobs(url).reachable():
            return url
    gcs, dash, agent, agent_grpc, runtime_env, metrics, client = free_ports(7)
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={gcs}"]
    cmd += ["--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"]
    # Every listening port free too: the defaults (52365 for the agent, 10001 for the client server) clash
    # with any other Ray on the machine, and a head without its agent cannot take jobs.
    cmd += [f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}"]
    cmd += [f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}"]
    cmd += [f"--ray-client-server-port={client}"]
    # "qpu" slots host the quantum pool's worker actors (services/quantum_pool); the trainer needs them
    cmd += [f"--resources={json.dumps({'qpu': qpu_slots})}", "--disable-usage-stats"]
    cmd += [f"--num-cpus={num_cpus}"] if num_cpus else []
    data_dir.mkdir(parents=True, exist_ok=True)
    log.info("starting a local Ray head: %s", " ".join(cmd))
    with open(data_dir / "ray-head.log", "ab") as out:
        head = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{dash}"
    state.write_text(json.dumps({"gcs_address": f"127.0.0.1:{gcs}", "dashboard_url": url, "pgid": head.pid}))
    deadline = time.time() + 180
    while not RayJobs(url).reachable():  # the job server comes up a few seconds after the GCS
        if head.poll() is not None or time.time() > deadline:
            stop_local_head(data_dir)
            raise RuntimeError(f"the local Ray head did not start; see {data_dir / 'ray-head.log'}")
        time.sleep(0.5)
    return url


def stop_local_head(data_dir: Path) -> bool:
    """Stop the embedded Ray head recorded in data_dir/ray.json (its whole process group)."""
    state = data_dir / "ray.json"
    if not state.exists():
        return False
    pgid = json.loads(state.read_text()).get("pgid")
    state.unlink()
    if not pgid:
        return False
    try:
        os.killpg(pgid, signal.SIGTERM)
        for _ in range(50):  # Ray's processes exit on SIGTERM; `ray start --block` may linger
            time.sleep(0.2)
            os.killpg(pgid, 0)
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


class Reconciler:
    """The background loop (one thread); `reconcile_once()` is one pass, callable directly in tests."""

    def __init__(self, state):
        self.settings, self.sessions, self.ledger = state.settings, state.sessions, state.ledger
        self.ray: RayJobs | None = state.ray
        self.metrics = state.metrics
        self.wake, self.stopping = threading.Event(), threading.Event()
        self.thread: threading.Thread | None = None
        self.stop_sent: set[str] = set()
        self.last_error: str | None = None
        self.secrets = [s for s in (os.environ.get("QISKIT_IBM_TOKEN"), self.settings.admin_key) if s]

    # --- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="qpeft-reconciler", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.ensure_ray()
                if self.ray is not None:
                    self.last_error = None
                    self.reconcile_once()
            except Exception as e:  # keep going: Ray or the database may be back on the next pass
                self.last_error = f"{type(e).__name__}: {e}"
                self.metrics.reconcile_errors.inc()
                log.warning("reconcile pass failed: %s", self.last_error)
            self.wake.wait(self.settings.poll_s)
            self.wake.clear()

    def ensure_ray(self) -> RayJobs | None:
        if self.ray is None:
            if not self.settings.embedded:
                self.ray = RayJobs(self.settings.ray_address)
            elif self.settings.start_ray:
                s = self.settings
                password = database_password(s.db_url)  # jobs get the URL without it (job_database_url)
                env = {"PGPASSWORD": password} if password else None
                self.ray = RayJobs(start_local_head(s.data_dir, s.ray_num_cpus, s.ray_qpu_slots, env))
        return self.ray

    # --- one pass ----------------------------------------------------------------------------------
    def reconcile_once(self) -> None:
        with self.sessions() as db:
            ids = db.scalars(select(Job.id).where(Job.state.in_(ACTIVE_STATES)).order_by(Job.created_at)).all()
        for job_id in ids:
            try:
                self.reconcile_job(job_id)
            except Exception as e:  # one job's trouble must not hold up the others
                self.last_error = f"job {job_id}: {type(e).__name__}: {e}"
                self.metrics.reconcile_errors.inc()
                log.warning("reconciling %s", self.last_error)

    def reconcile_job(self, job_id: str) -> None:
        with self.sessions() as db:
            job = db.get(Job, job_id)
            if job is None or job.state not in ACTIVE_STATES:
                return
            sid = job.ray_submission_id
            if job.cancel_requested and job.submitted_at is None:
                self._finish(db, job, "CANCELLED", "cancelled before it started")
                return
            status = self.ray.status(sid)
            if status is None:
                if job.submitted_at is None:
                    try:
                        self._submit(db, job)
                    except Exception as e:  # Ray busy or down: the job stays QUEUED, retried next pass
                        job.reason = f"waiting to be submitted to Ray: {type(e).__name__}: {e}"[:500]
                        db.commit()
                        raise
                else:
                    self._finish(db, job, "FAILED", f"lost: Ray has no record of {sid} (cluster restarted?)")
                return
            ray_status, message = status.status, status.message
            if job.submitted_at is None:  # accepted before a crash that kept us from recording it
                job.submitted_at = now()
            if job.cancel_requested and ray_status not in TERMINAL and sid not in self.stop_sent:
                self.ray.stop(sid)
                self.stop_sent.add(sid)
            self._read_logs(db, job, complete=ray_status in TERMINAL)
            if ray_status == "RUNNING" and job.state == "QUEUED":
                job.state, job.started_at = "RUNNING", job.started_at or now()
            if ray_status in TERMINAL:
                if self._resubmittable(job, status):
                    self._next_attempt(db, job, message)
                else:
                    self._finish(db, job, *final_state(job, ray_status, message))
            db.commit()

    def _resubmittable(self, job: Job, status: RayStatus) -> bool:
        """Only a driver that died without a word: the trainer prints a result event whenever it ends by itself
        (failed on its spec, out of budget, cancelled), and then it stays ended."""
        return (
            status.driver_killed()
            and job.result_state is None
            and not job.cancel_requested
            and job.attempt < self.settings.max_attempts
        )

    def _next_attempt(self, db, job: Job, message: str | None) -> None:
        """Charge the dead attempt's shots in flight as lost, record why, and queue a fresh Ray submission; the
        trainer resumes from the job's last checkpoint (Ray Train restores its run by name and storage)."""
        db.commit()  # the log lines just read first: the ledger writes on its own connection (SQLite: one writer)
        self._release_open(db, job)
        why = (message or "the driver died").strip().splitlines()[0][:300]
        nxt = job.attempt + 1
        line = (
            f"qpeft: attempt {job.attempt} of {self.settings.max_attempts} ended when its driver died ({why}); "
            f"resubmitting as attempt {nxt} from the last checkpoint"
        )
        job.log_base += job.log_offset + 1  # the new attempt's log is numbered after this line
        db.add(JobLog(job_id=job.id, seq=job.log_base, time=time.time(), line=line))
        job.attempt, job.log_offset = nxt, 0
        job.ray_submission_id = f"qpeft-{job.id}-{nxt}"
        job.submitted_at, job.sub_state, job.reason = None, None, line[len("qpeft: ") :]
        job.result_state = job.result_reason = None
        self.metrics.resubmitted.inc()
        log.warning("job %s: %s", job.id, line)

    def _read_logs(self, db, job: Job, complete: bool) -> None:
        """Ingest the log's new lines. Status is read before the log, so a finished job's log is whole;
        while it runs, a last line without its newline may still be growing and waits for the next pass."""
        lines = self.ray.logs(job.ray_submission_id).split("\n")
        if lines[-1] == "" or not complete:
            lines.pop()
        new = lines[job.log_offset :]
        if new:
            ingest(db, job, new, self.settings.job_dir(job.id), self.secrets)

    def _submit(self, db, job: Job) -> None:
        from pydantic import ValidationError

        from .access import resolve_spec

        try:  # resolved again for the job's tenant: the trainer reads only the paths written here
            spec = resolve_spec(job.spec, self.settings, db, job.tenant)
        except ValidationError as e:  # e.g. an operator took a data root away while the job queued
            problems = "; ".join(err["msg"] for err in e.errors(include_url=False, include_input=False))
            self._finish(db, job, "FAILED", f"the spec no longer validates: {problems}"[:1000])
            return
        jdir = self.settings.job_dir(job.id)
        spec_path = spec.dump(jdir / "spec.json")
        (jdir / "artifacts").mkdir(parents=True, exist_ok=True)
        entry = self.settings.trainer_command.format(python=shlex.quote(self.settings.python))
        env = {
            "QPEFT_DATABASE_URL": job_database_url(self.settings.db_url),
            "QPEFT_JOB_ID": job.id,
            "QPEFT_TENANT": job.tenant,
            "QPEFT_LEDGER_KEY": f"job:{job.id}",
            "QPEFT_ATTEMPT": str(job.attempt),
            "QPEFT_ARTIFACT_DIR": str(jdir / "artifacts"),
            "PYTHONUNBUFFERED": "1",  # events must reach the log as they happen
            **({"QPEFT_SHARED_DATA": os.environ["QPEFT_SHARED_DATA"]} if os.environ.get("QPEFT_SHARED_DATA") else {}),
            **self.settings.job_env,
        }
        self.ray.submit(
            job.ray_submission_id,
            f"{entry} --spec {shlex.quote(str(spec_path))}",
            env,
            {"qpeft_job_id": job.id, "qpeft_tenant": job.tenant},
        )
        job.submitted_at, job.reason = now(), None
        db.commit()

    def _finish(self, db, job: Job, state: str, reason: str) -> None:
        job.state, job.reason, job.sub_state, job.finished_at = state, reason, None, now()
        db.commit()
        self._release_open(db, job)

    def _release_open(self, db, job: Job) -> None:
        """A trainer that died mid-call leaves reservations open: charge them as lost, as the pool does. A dead
        worker's late commit then finds them closed and changes nothing, so no shot is charged twice."""
        open_ids = db.scalars(
            select(Reservation.id).where(Reservation.key == f"job:{job.id}", Reservation.state == "open")
        ).all()
        for rid in open_ids:
            shots = db.get(Reservation, rid).shots
            self.ledger.release(rid, lost=shots)
