"""Prometheus metrics: request latency observed in a middleware, job and shot totals read from the database
at scrape time (so several API replicas report the same numbers). One registry per app."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import func, select

from .models import STATES, Budget, Job


class DbCollector:
    """Job and shot totals. by_tenant: labelled by tenant (an account an operator bills; their count stays
    small), for the admin key or the metrics token; otherwise summed over tenants, so that the public scrape
    names no tenant."""

    def __init__(self, sessions, by_tenant: bool):
        self.sessions, self.by_tenant = sessions, by_tenant

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
        if not self.by_tenant:  # one row per state, one per metric: the tenant column summed away
            by_state = [("", s, sum(n for _, s2, n in by_state if s2 == s)) for s in STATES]
            accounts = [("", *(sum(a[i] or 0 for a in accounts) for i in range(1, 5)))]
            calls = [("", sum(n for _, n in calls))]
        labels = ["tenant"] if self.by_tenant else []

        def values(tenant):
            return [tenant] if self.by_tenant else []

        title = "Jobs by tenant and state" if self.by_tenant else "Jobs by state"
        jobs = GaugeMetricFamily("qpeft_jobs", title, labels=[*labels, "state"])
        counts = {(t, s): n for t, s, n in by_state}
        for tenant in sorted({t for t, _ in counts}):
            for state in STATES:
                jobs.add_metric([*values(tenant), state], counts.get((tenant, state), 0))
        yield jobs
        families = {
            "spent": CounterMetricFamily("qpeft_shots_spent", "Shots committed", labels=labels),
            "lost": CounterMetricFamily("qpeft_shots_lost", "Shots charged as lost (failed calls)", labels=labels),
            "reserved": GaugeMetricFamily("qpeft_shots_reserved", "Shots held by calls in flight", labels=labels),
            "qpu": CounterMetricFamily("qpeft_qpu_seconds", "QPU seconds charged", labels=labels),
        }
        for key, spent, lost, reserved, qpu in accounts:
            for name, value in zip(families, (spent, lost, reserved, qpu or 0.0), strict=True):
                families[name].add_metric(values(key), value)
        yield from families.values()
        pool = CounterMetricFamily("qpeft_pool_calls", "Quantum pool calls reported by trainers", labels=labels)
        for tenant, n in calls:
            pool.add_metric(values(tenant), n)
        yield pool


class Metrics:
    """Two registries over the same collectors: `registry` with tenant labels (operators), `public` with
    totals only. Request latency is labelled by route template, so it names no job either."""

    def __init__(self, sessions):
        self.registry, self.public = CollectorRegistry(), CollectorRegistry()
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
        self.registry.register(DbCollector(sessions, by_tenant=True))
        for shared in (self.latency, self.reconcile_errors, self.resubmitted):
            self.public.register(shared)
        self.public.register(DbCollector(sessions, by_tenant=False))


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
