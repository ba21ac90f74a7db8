"""Settings from the environment (QPEFT_*), resolved once per app.

Embedded mode (no RAY_ADDRESS / QPEFT_RAY_ADDRESS): a SQLite file and a local Ray head under the data
dir. Cluster mode: QPEFT_DATABASE_URL (PostgreSQL) and the Ray cluster at the given address; the data dir
(specs, artifacts) must then be storage the Ray nodes share.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path

from pydantic import BaseModel, Field


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "qpeft"


def _paths(value: str | None) -> list[str] | None:
    """QPEFT_DATA_ROOTS=/a:/b (os.pathsep-separated)."""
    return [p for p in value.split(os.pathsep) if p] if value else None


class Settings(BaseModel):
    data_dir: Path = Field(default_factory=_default_data_dir)
    database_url: str | None = None  # None: sqlite file under data_dir
    ray_address: str | None = None  # None: embedded (start or reuse a local Ray head)
    ray_dashboard_url: str | None = None  # link shown on the dashboard; default: the job server's address
    admin_key: str | None = None  # None: generated once in embedded mode and printed
    pepper: str | None = None  # None: generated once and kept in data_dir/pepper
    trainer_command: str = "{python} -m services.trainer"
    trainer_python: str | None = None  # {python} above; None: this interpreter (embedded), `python` (cluster)
    job_env: dict[str, str] = Field(default_factory=dict)  # extra env vars for every job
    poll_s: float = 1.0  # reconciler period
    start_ray: bool = True  # embedded mode may start a Ray head; False: never (tests, readonly tools)
    ray_num_cpus: int | None = None  # embedded head's CPUs (None: all)
    ray_qpu_slots: int = 2  # embedded head's "qpu" resource: concurrent quantum workers
    metrics_token: str | None = None  # bearer token for /metrics with tenant labels (Prometheus); the admin key too
    max_body_bytes: int = Field(1 << 20, ge=1024)  # request bodies above this get 413 (routes may set their own)
    # What a job may ask of the cluster: None reads the Ray cluster's CPUs / GPUs (cached); set them to the
    # ceiling of an autoscaling cluster, whose nodes may not be up yet
    cluster_cpus: int | None = Field(None, ge=0)
    cluster_gpus: int | None = Field(None, ge=0)
    # IBM devices jobs may name when the API holds no IBM account (only the quantum workers do)
    ibm_backends: list[str] = Field(default_factory=list)
    max_upload_bytes: int = 200 * 2**20  # largest data set a tenant may upload
    # Server folders whose files (data) and checkpoint directories (models) a spec may name by path; none by
    # default: tenants upload data (POST /v1/datasets) and name known models.
    data_roots: list[Path] = Field(default_factory=list)
    model_roots: list[Path] = Field(default_factory=list)
    hub_cache: Path | None = None  # Hugging Face hub cache for hub ids (None: the hub library's default)
    max_attempts: int = Field(3, ge=1)  # Ray submissions per job when its driver dies (killed, node lost)
    # The price of a QPU second for the cost figures. Default: IBM Quantum's Pay-As-You-Go rate as published
    # on ibm.com/quantum/pricing (USD 96 per minute, read 2026-12-07); set your contract's rate.
    qpu_usd_per_s: float = Field(1.60, ge=0)

    @property
    def embedded(self) -> bool:
        return self.ray_address is None

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'qpeft.db').resolve()}"

    @property
    def python(self) -> str:
        return self.trainer_python or (sys.executable if self.embedded else "python")

    def job_dir(self, job_id: str) -> Path:
        return (self.data_dir / "jobs" / job_id).resolve()

    def datasets_dir(self, tenant: str) -> Path:
        """A tenant's uploaded data sets: beside the job folders, so on the storage the Ray nodes share."""
        return (self.data_dir / "datasets" / tenant).resolve()

    def resolved_pepper(self) -> str:
        """The server pepper for API-key hashes; generated once and kept beside the database."""
        if self.pepper:
            return self.pepper
        path = self.data_dir / "pepper"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        return path.read_text().strip()

    @classmethod
    def from_env(cls, **overrides) -> Settings:
        env = os.environ
        values = {
            "data_dir": env.get("QPEFT_DATA_DIR"),
            "database_url": env.get("QPEFT_DATABASE_URL"),
            "ray_address": env.get("QPEFT_RAY_ADDRESS") or env.get("RAY_ADDRESS"),
            "ray_dashboard_url": env.get("QPEFT_RAY_DASHBOARD_URL"),
            "admin_key": env.get("QPEFT_ADMIN_KEY"),
            "pepper": env.get("QPEFT_PEPPER"),
            "trainer_command": env.get("QPEFT_TRAINER_COMMAND"),
            "trainer_python": env.get("QPEFT_TRAINER_PYTHON"),
            "job_env": json.loads(env["QPEFT_JOB_ENV"]) if env.get("QPEFT_JOB_ENV") else None,
            "poll_s": env.get("QPEFT_POLL_S"),
            "ray_num_cpus": env.get("QPEFT_RAY_NUM_CPUS"),
            "ray_qpu_slots": env.get("QPEFT_RAY_QPU_SLOTS"),
            "metrics_token": env.get("QPEFT_METRICS_TOKEN"),
            "max_body_bytes": env.get("QPEFT_MAX_BODY_BYTES"),
            "cluster_cpus": env.get("QPEFT_CLUSTER_CPUS"),
            "cluster_gpus": env.get("QPEFT_CLUSTER_GPUS"),
            "ibm_backends": env["QPEFT_IBM_BACKENDS"].replace(",", " ").split()
            if env.get("QPEFT_IBM_BACKENDS")
            else None,
            "max_upload_bytes": env.get("QPEFT_MAX_UPLOAD_BYTES"),
            "data_roots": _paths(env.get("QPEFT_DATA_ROOTS")),
            "model_roots": _paths(env.get("QPEFT_MODEL_ROOTS")),
            "hub_cache": env.get("QPEFT_HUB_CACHE"),
            "max_attempts": env.get("QPEFT_MAX_ATTEMPTS"),
            "qpu_usd_per_s": env.get("QPEFT_QPU_USD_PER_S"),
        }
        values = {k: v for k, v in values.items() if v is not None}
        values.update(overrides)
        return cls(**values)
