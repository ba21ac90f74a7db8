"""Prometheus metrics: request latency observed in a middleware, job and shot totals read from the database
at scrape time (so several API replicas report the same numbers). One registry per app."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import func, select

from .models import STATES, Budget, Job


class DbCollector:
    """Labelled by tenant: a tenant is an account an operator bills, and their count stays small."""

    def __init__(self, sessions):
        self.sessions = sessions

    def collect(self):
        with self.sessions() as db:
            by_state = db.execute(select(Job.tenant, Job.state, func.count()).group_by(Job.tenant, Job.state)).all()
            accounts = db.execute(
                select(Budget.key, Budget.spent, Budget.lost, Budget.reserved, Budget.qpu_s_spent).where(
                    Budget.parent.is_(None)  # tenant accounts; job accounts are counted in them too
                )
            ).all()
            calls = db.execute(
                select(Job.tenant, func.coalesce(func.sum(Job.pool_calls), 0)).group_by(Job.tenant)
            ).all()
        jobs = GaugeMetricFamily("qpeft_jobs", "Jobs by tenant and state", labels=["tenant", "state"])
        counts = {(t, s): n for t, s, n in by_state}
        for tenant in sorted({t for t, _ in counts}):
            for state in STATES:
                jobs.add_metric([tenant, state], counts.get((tenant, state), 0))
        yield jobs
        families = {
            "spent": CounterMetricFamily("qpeft_shots_spent", "Shots committed", labels=["tenant"]),
            "lost": CounterMetricFamily("qpeft_shots_lost", "Shots charged as lost (failed calls)", labels=["tenant"]),
            "reserved": GaugeMetricFamily("qpeft_shots_reserved", "Shots held by calls in flight", labels=["tenant"]),
            "qpu": CounterMetricFamily("qpeft_qpu_seconds", "QPU seconds charged", labels=["tenant"]),
        }
        for key, spent, lost, reserved, qpu in accounts:
            for name, value in zip(families, (spent, lost, reserved, qpu or 0.0), strict=True):
                families[name].add_metric([key], value)
        yield from families.values()
        pool = CounterMetricFamily("qpeft_pool_calls", "Quantum pool calls reported by trainers", labels=["tenant"])
        for tenant, n in calls:
            pool.add_metric([tenant], n)
        yield pool


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
        self.resubmitted = Counter(
            "qpeft_jobs_resubmitted", "Jobs resubmitted to Ray after their driver died", registry=self.registry
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
