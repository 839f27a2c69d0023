"""Schemathesis against the proxy's own OpenAPI schema (``/openapi.json``).

The proxy runs for real (uvicorn on loopback) in front of the scripted upstream, with an
admin token set. For every operation schemathesis generates requests from the schema, both
conforming (positive) and violating it (negative), and checks: never a 5xx, the status code
and content type are the documented ones, conforming chat requests are accepted, violating
ones are rejected with a 4xx, and every 4xx is in the OpenAI error shape (or the documented
JSON of the admin and readiness endpoints). Derandomized, so a CI run is repeatable.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from guard.app import create_app
from guard.settings import Settings
from tests.scripted_upstream import Script, build_upstream
from tests.servers import ServerThread

schemathesis = pytest.importorskip("schemathesis", reason="install schemathesis (the test extra) to fuzz the API")

from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    positive_data_acceptance,
    status_code_conformance,
)

EXAMPLES = {"/v1/chat/completions": 120}
ADMIN_TOKEN = "fuzz-admin-token"


@schemathesis.check
def openai_error_shape(ctx, response, case):
    """A 4xx from the guard is ``{"error": {"message", "type", "param", "code"}}``."""
    if 400 <= response.status_code < 500 and case.path != "/admin/policy/reload" or response.status_code in (401, 404):
        error = json.loads(response.content)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], response.content[:300]
    return None


@pytest.fixture
def api(start_proxy, script):
    script.probe_reply = json.dumps({"will_refuse": False, "confidence": 4, "harm_rating": 1, "topic": "other"})
    proxy = start_proxy(mode="sequential", admin_token=ADMIN_TOKEN)
    schema = schemathesis.openapi.from_url(proxy.url + "/openapi.json")
    return proxy, schema


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_schemathesis_no_server_errors_and_clear_4xx(api, mode):
    proxy, schema = api
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/models", "/healthz", "/readyz",
                                              "/metrics", "/admin/policy/reload"}
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, openai_error_shape]
    checks.append(positive_data_acceptance if mode is GenerationMode.POSITIVE else negative_data_rejection)
    seen: dict[str, set[int]] = {}
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and not len(operation.body):
            continue  # nothing to violate in an operation without a body schema

        @settings(max_examples=EXAMPLES.get(operation.path, 10), derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case):
            response = case.call_and_validate(base_url=proxy.url, checks=checks)
            seen.setdefault(operation.path, set()).add(response.status_code)

        fuzz()
    print({path: sorted(codes) for path, codes in seen.items()})
    if mode is GenerationMode.POSITIVE:
        assert 200 in seen["/v1/chat/completions"]
    else:
        assert seen["/v1/chat/completions"] <= {400, 413}


@pytest.fixture(scope="module")
def shared_proxy():
    """One proxy (and scripted upstream) for every hypothesis example, stopped with the module."""
    with ServerThread(build_upstream(Script())) as upstream:
        config = Settings(upstream=upstream.url + "/v1", mode="sequential", datapoints=None)
        with ServerThread(create_app(config, registry=CollectorRegistry())) as proxy:
            yield proxy


@settings(max_examples=150, derandomize=True, deadline=None, database=None)
@given(body=st.one_of(
    st.binary(max_size=512),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                 lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
                 max_leaves=20).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"messages": st.lists(st.dictionaries(
        st.sampled_from(["role", "content", "name"]),
        st.one_of(st.none(), st.integers(), st.text(max_size=20), st.lists(st.dictionaries(
            st.sampled_from(["type", "text"]), st.text(max_size=10), max_size=2), max_size=2)), max_size=3), max_size=3),
        "stream": st.one_of(st.booleans(), st.none(), st.integers(0, 1))}).map(lambda v: json.dumps(v).encode()),
))
def test_arbitrary_bodies_never_get_a_5xx(shared_proxy, body):
    """Raw bytes and near-miss chat bodies straight at the handler (one shared proxy per run)."""
    r = httpx.post(shared_proxy.url + "/v1/chat/completions", content=body, timeout=20,
                   headers={"content-type": "application/json"})
    status, payload = r.status_code, r.content
    assert status < 500, payload[:300]
    if status >= 400:
        error = json.loads(payload)["error"]
        assert set(error) == {"message", "type", "param", "code"}
