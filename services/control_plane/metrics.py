"""Prometheus metrics: request latency observed in a middleware, job and shot totals read from the database
at scrape time (so several API replicas report the same numbers). One registry per app."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import func, select

from .models import STATES, Budget, Job


class DbCollector:
    def __init__(self, sessions):
        self.sessions = sessions

    def collect(self):
        with self.sessions() as db:
            by_state = dict(db.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            spent, lost, reserved, qpu = db.execute(
                select(
                    func.coalesce(func.sum(Budget.spent), 0),
                    func.coalesce(func.sum(Budget.lost), 0),
                    func.coalesce(func.sum(Budget.reserved), 0),
                    func.coalesce(func.sum(Budget.qpu_s_spent), 0.0),
                ).where(Budget.parent.is_(None))  # tenant accounts; job accounts are counted in them too
            ).one()
            calls = db.scalar(select(func.coalesce(func.sum(Job.pool_calls), 0)))
        jobs = GaugeMetricFamily("qpeft_jobs", "Jobs by state", labels=["state"])
        for state in STATES:
            jobs.add_metric([state], by_state.get(state, 0))
        yield jobs
        yield CounterMetricFamily("qpeft_shots_spent", "Shots committed over all tenants", value=spent)
        yield CounterMetricFamily("qpeft_shots_lost", "Shots charged as lost (failed calls)", value=lost)
        yield GaugeMetricFamily("qpeft_shots_reserved", "Shots held by calls in flight", value=reserved)
        yield CounterMetricFamily("qpeft_qpu_seconds", "QPU seconds charged over all tenants", value=qpu)
        yield CounterMetricFamily("qpeft_pool_calls", "Quantum pool calls reported by trainers", value=calls)


class Metrics:
    def __init__(self, sessions):
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "qpeft_http_request_duration_seconds",
            "API request latency",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "qpeft_reconcile_errors", "Reconciler passes that failed", registry=self.registry
        )
        self.registry.register(DbCollector(sessions))


class LatencyMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware) so streamed responses (SSE, log follow) pass through untouched;
    latency is time to the response headers, labelled by route template (bounded label values)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()

        async def send_and_observe(message):
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", "unmatched")
                status = str(message["status"])
                self.metrics.latency.labels(scope["method"], route, status).observe(time.perf_counter() - t0)
            await send(message)

        await self.app(scope, receive, send_and_observe)
