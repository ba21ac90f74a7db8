"""Property-based tests of the API from its own OpenAPI document (schemathesis): generated requests, valid
and invalid, never get a 5xx, and responses match the documented status codes, content types and schemas.
A sample runs always (50 examples per operation); the slow test runs more than 1000 cases."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from services.control_plane.app import create_app  # noqa: E402
from tests.test_control_plane_support import ADMIN, SPEC, FakeRay, make_settings, new_tenant  # noqa: E402

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
ENDLESS = {"/v1/events"}  # a live stream with no end: exercised by the browser test instead


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    d = tmp_path_factory.mktemp("schema")
    app = create_app(make_settings(d / "data", f"sqlite:///{d / 'qpeft.db'}"), ray=FakeRay(), reconcile=False)
    with TestClient(app) as client:
        key = new_tenant(client, "acme", shots=10**6)
        assert client.post("/v1/jobs", json=SPEC, headers=key).status_code == 201
        yield schemathesis.openapi.from_asgi("/openapi.json", app), key


def fuzz(schema, tenant_key: dict, max_examples: int) -> int:
    """Run every operation with up to `max_examples` generated cases; returns how many ran."""
    count, failures = [0], []

    def runner(op, headers):
        @settings(max_examples=max_examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(op.as_strategy())
        def run(case):
            count[0] += 1
            case.call_and_validate(headers=headers, checks=CHECKS)

        return run

    for result in schema.get_all_operations():
        op = result.ok()
        if op.path in ENDLESS:
            continue
        headers = {"X-API-Key": ADMIN} if op.path.startswith("/v1/tenants") else tenant_key
        try:
            runner(op, headers)()
        except Exception as e:  # collect across operations, then report them all
            failures.append(f"{op.method.upper()} {op.path}: {e}")
    assert not failures, "\n\n".join(failures)
    return count[0]


def test_openapi_sample(api):
    schema, key = api
    assert fuzz(schema, key, max_examples=50) > 300


@pytest.mark.slow
def test_openapi_thousand_cases(api):
    schema, key = api
    assert fuzz(schema, key, max_examples=150) >= 1000
