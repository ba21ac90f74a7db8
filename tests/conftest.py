import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("QPEFT_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set QPEFT_SHARED_DATA)")
    return SHARED_DATA


@dataclass
class RayCluster:
    address: str  # GCS address, for ray.init(address=...)
    dashboard_url: str  # job server, for JobSubmissionClient
    ray: object  # the ray module, connected as a driver


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One real local Ray head per test session, shared by every Ray test.

    Started exactly as the embedded control plane starts its head (a separate `ray start --head` process, every
    port a free one, so no clash with Redis on 6379 or with another Ray on the machine), so the Ray Jobs API
    and dashboard are there too; two units of the custom resource "qpu" host quantum workers; the test process
    attaches as a driver.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token file for a throwaway local cluster
    ray = pytest.importorskip("ray")
    from services.control_plane.ray_jobs import start_local_head, stop_local_head

    data = tmp_path_factory.mktemp("ray-head")
    url = start_local_head(data, num_cpus=2, qpu_slots=2)
    gcs = json.loads((data / "ray.json").read_text())["gcs_address"]
    ray.init(address=gcs, logging_level="WARNING")
    yield RayCluster(gcs, url, ray)
    ray.shutdown()
    stop_local_head(data)
