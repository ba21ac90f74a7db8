"""A burst on a real server: 500 requests at once against uvicorn on PostgreSQL with a pool of 2 connections
(and none beyond), while two live streams (a log follow and the SSE events of a job) stay open. Every
request must answer (200, 201 for a new job) well before the pool's timeout: a request's database work happens in one
threadpool hop with one connection at a time (auth.SessionReleasingRoute), and a stream holds none between
its polls, so no request can hold a connection while it waits for something else."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

import httpx
import pytest
from fastapi import APIRouter, Depends

from services.control_plane.app import create_app
from services.control_plane.auth import Db, SessionReleasingRoute
from tests.test_control_plane_support import (  # noqa: F401  (fixtures)
    SPEC,
    FakeRay,
    LiveServer,
    _drop_schema,
    _pg_schema_url,
    make_settings,
    new_tenant,
    pg_admin,
)

POOL_TIMEOUT_S = 5
N = 500


def mix(job_id: str, uploaded: dict) -> list[tuple[str, str, dict | None, dict]]:
    """N requests (method, path, body, headers): lists, single jobs, metrics, budgets, estimates and
    submissions with an Idempotency-Key on the tenant's uploaded data set (which read rows and the ledger)."""
    kinds = [
        ("GET", "/v1/jobs?limit=5", None),
        ("GET", f"/v1/jobs/{job_id}", None),
        ("GET", f"/v1/jobs/{job_id}/metrics", None),
        ("GET", "/v1/budget", None),
        ("POST", "/v1/jobs", uploaded),
        ("GET", f"/v1/jobs/{job_id}", None),
        ("GET", "/v1/jobs?state=QUEUED&limit=5", None),
        ("POST", "/v1/estimate", uploaded),
    ]
    return [(*kinds[i % len(kinds)], {"Idempotency-Key": f"burst-{i}"}) for i in range(N)]


async def next_line_with(lines, text: str) -> str:
    async for line in lines:
        if text in line:
            return line
    raise AssertionError(f"the stream ended before {text!r}")


async def burst(url: str, key: dict, job_id: str, uploaded: dict, log_after) -> tuple[list[int], list[str]]:
    """Codes of N concurrent requests (a timeout raises) while a log follow and an SSE stream are open; then
    `log_after()` writes a log line, and both streams must still deliver it."""
    limits = httpx.Limits(max_connections=N + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, headers=key, limits=limits, timeout=60) as client:
        follow = client.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": "true", "tail": 0})
        events = client.stream("GET", f"/v1/jobs/{job_id}/events")
        async with follow as log_stream, events as sse:
            assert (log_stream.status_code, sse.status_code) == (200, 200)
            requests = mix(job_id, uploaded)
            answers = await asyncio.gather(*(client.request(m, p, json=body, headers=h) for m, p, body, h in requests))
            await asyncio.to_thread(log_after)
            streamed = await asyncio.wait_for(
                asyncio.gather(
                    next_line_with(log_stream.aiter_lines(), "after the burst"),
                    next_line_with(sse.aiter_lines(), "after the burst"),
                ),
                timeout=30,
            )
        return [r.status_code for r in answers], streamed


def test_500_requests_at_once_on_a_pool_of_2_all_answer(tmp_path, pg_admin, monkeypatch):  # noqa: F811
    monkeypatch.setenv("QPEFT_DB_POOL_SIZE", "2")
    monkeypatch.setenv("QPEFT_DB_MAX_OVERFLOW", "0")
    monkeypatch.setenv("QPEFT_DB_POOL_TIMEOUT", str(POOL_TIMEOUT_S))
    schema, url = _pg_schema_url(pg_admin)
    ray = FakeRay()
    try:
        app = create_app(make_settings(tmp_path / "data", url), ray=ray, reconcile=False)
        assert app.state.sessions.kw["bind"].pool.size() == 2  # the small pool is the one in use
        with LiveServer(app) as server:
            with httpx.Client(base_url=server.url) as c:
                key = new_tenant(c, "acme")
                r = c.post("/v1/jobs", json=SPEC, headers=key)
                assert r.status_code == 201, r.text
                d = c.post("/v1/datasets", params={"name": "corpus.txt"}, content=b"to be or not\n" * 40, headers=key)
                assert d.status_code == 201, d.text
            job_id = r.json()["id"]
            app.state.reconciler.reconcile_once()  # hands the job to (fake) Ray

            def log_after():
                ray.emit(f"qpeft-{job_id}", "a line after the burst")
                app.state.reconciler.reconcile_once()

            uploaded = {**SPEC, "dataset": d.json()["id"]}
            t = time.perf_counter()
            codes, streamed = asyncio.run(burst(server.url, key, job_id, uploaded, log_after))
            print(f"{N} requests in {time.perf_counter() - t:.1f} s")
        # a request that waited out the pool's timeout would have answered 500
        expected = [201 if m == "POST" and p == "/v1/jobs" else 200 for m, p, *_ in mix(job_id, {})]
        assert codes == expected, {code: codes.count(code) for code in set(codes)}
        assert streamed[0] == "a line after the burst" and '"a line after the burst"' in streamed[1]
    finally:
        _drop_schema(pg_admin, schema, url)


def _needs_db(db: Db) -> int:  # a sync dependency: its own hop, before the endpoint's
    return 1


def _uses(n: Annotated[int, Depends(_needs_db)]):
    return n


async def _streams(db: Db):  # database work on the event loop, its session open until the response ends
    return 1


def _fine(db: Db):
    return 1


def test_a_route_that_could_hold_a_session_between_hops_is_refused_when_built():
    router = APIRouter(route_class=SessionReleasingRoute)
    with pytest.raises(TypeError, match="_needs_db"):
        router.add_api_route("/a", _uses)
    with pytest.raises(TypeError, match="_streams"):
        router.add_api_route("/b", _streams)
    router.add_api_route("/c", _fine)
    assert [r.path for r in router.routes] == ["/c"]
