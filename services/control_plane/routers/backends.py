"""/v1/backends: the executors a JobSpec can name here."""

from __future__ import annotations

import threading
import time

from fastapi import APIRouter

from .. import schemas
from ..auth import Authenticated, SessionReleasingRoute

router = APIRouter(route_class=SessionReleasingRoute, tags=["backends"])
_cache: dict = {"at": 0.0, "items": None}
_lock = threading.Lock()
TTL_S = 300  # listing IBM devices needs the network; fake devices never change


def listing() -> list[dict]:
    """The executors this server can run, cached for TTL_S (IBM devices only with an account)."""
    from qpeft_core.quantum.registry import available_backends

    with _lock:
        if _cache["items"] is None or time.monotonic() - _cache["at"] > TTL_S:
            items = []
            for b in available_backends():
                status = {"simulator": "available", "fake": "available (local simulation of the device)"}
                items.append({**b, "status": status.get(b["kind"], "configured (IBM account)")})
            _cache.update(at=time.monotonic(), items=items)
        return _cache["items"]


@router.get(
    "/v1/backends",
    response_model=list[schemas.Backend],
    responses=schemas.errors(401),
    summary="Executors: simulators, fake IBM devices, and IBM devices when an account is configured",
)
def backends(_: Authenticated) -> list[schemas.Backend]:
    return [schemas.Backend(**b) for b in listing()]
