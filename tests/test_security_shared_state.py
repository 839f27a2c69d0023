"""Issue 23, rows 3 and 10: nothing one client sends changes what the guard does for another.

* Row 3: a header the upstream (or a gateway in front of it) routes on, such as ``x-route: slow``,
  reaches a client's own probes, but never the check probe that decides for everyone sharing the
  breaker's and dialect's key: the check carries only the key's headers (the credentials). So that
  client cannot open the breaker for every client of the model (5 requests used to do it), nor drop
  every client to a weaker structured-output dialect (one request used to do it, for 600 s).
* Row 10: a model takes a ``model`` label slot only if the upstream lists it in ``GET /models`` (or
  the operator configures it): junk names an upstream happily answers never take one, so the real
  model still gets its own label after 20 junk names (it used to be ``other`` for good).

Real servers on loopback: the scripted upstream (``tests/scripted_upstream.py``), a small
dialect-checking upstream below, and the proxy under uvicorn.
"""

from __future__ import annotations

import json
import threading

import httpx
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fault_upstream import metric_samples, metric_sum
from tests.servers import ServerThread, eventually

PROBE_TIMEOUT = 0.4
FAILURES = 5


def chat(url: str, text: str, headers: dict[str, str] | None = None, model: str = "m") -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=20, headers=headers or {},
                      json={"model": model, "messages": [{"role": "user", "content": text}]})


def checks(url: str) -> tuple[float, float]:
    s = metric_samples(url)
    return (metric_sum(s, "refusal_guard_probe_checks_total", result="healthy"),
            metric_sum(s, "refusal_guard_probe_checks_total", result="unhealthy"))


# --- row 3: the breaker ---------------------------------------------------------------------------

def test_a_routing_header_cannot_open_the_breaker_for_other_clients(start_proxy, script):
    """The upstream sends ``x-route: slow`` calls to a dead backend. The attacker's own probes time
    out (its own requests are blocked: on_probe_failure=block), the breaker falls due, and the check
    probe, without the attacker's header, answers: the breaker stays closed and a victim sharing the
    model (and the absence of credentials) is still probed and passed."""
    script.probe_stall = lambda body, headers: 3.0 if headers.get("x-route") == "slow" else 0.0
    proxy = start_proxy(mode="sequential", probe_timeout=PROBE_TIMEOUT, circuit_failures=FAILURES,
                        circuit_cooldown=60, on_probe_failure="block")
    for rounds in range(2):
        for i in range(FAILURES):
            response = chat(proxy.url, f"attack {rounds} {i}", {"x-route": "slow"})
            assert response.headers["x-refusal-guard-action"] == "block"  # its own probe timed out
        eventually(lambda: checks(proxy.url) == (rounds + 1, 0), what="the check probe, healthy")
    s = metric_samples(proxy.url)
    assert metric_sum(s, "refusal_guard_probe_circuit_open") == 0
    assert metric_sum(s, "refusal_guard_probe_failures_total", reason="timeout") == 2 * FAILURES

    probes = script.of("probe")
    routed = [p for p in probes if p.headers.get("x-route") == "slow"]
    unrouted = [p for p in probes if "x-route" not in p.headers]
    assert len(routed) == 2 * FAILURES  # the attacker's own probes carried its header (they are its)
    assert len(unrouted) == 2  # the two check probes did not
    assert all("capital of France" in p.body.decode() for p in unrouted)

    response = chat(proxy.url, "What is a good name for a cat?")
    assert response.status_code == 200
    assert response.headers["x-refusal-guard-action"] == "pass"
    assert response.headers["x-refusal-guard-prediction"] == "comply"  # probed, not skipped by a breaker


def test_the_check_probe_carries_the_credentials_it_is_keyed_by(start_proxy, script):
    """The check keeps the key's own headers (its credentials), so a client whose key really is
    routed to a dead backend still opens its own breaker (and only its own)."""
    script.probe_stall = lambda body, headers: 3.0 if headers.get("x-api-key") == "slow-key" else 0.0
    proxy = start_proxy(mode="sequential", probe_timeout=PROBE_TIMEOUT, circuit_failures=FAILURES,
                        circuit_cooldown=60)
    for i in range(FAILURES):
        chat(proxy.url, f"q{i}", {"x-api-key": "slow-key", "x-route": "anything"})
    eventually(lambda: checks(proxy.url) == (0, 1), what="the slow key's check, unhealthy")
    check = [p for p in script.of("probe") if "capital of France" in p.body.decode()]
    assert len(check) == 1
    assert check[0].headers.get("x-api-key") == "slow-key" and "x-route" not in check[0].headers
    assert metric_sum(metric_samples(proxy.url), "refusal_guard_probe_circuit_open") == 1
    assert chat(proxy.url, "hello", {"x-api-key": "other-key"}).headers["x-refusal-guard-prediction"] == "comply"


# --- row 3: the structured-output dialect ---------------------------------------------------------

class DialectUpstream:
    """Answers probes in any dialect, except that calls carrying ``x-route: legacy`` go to a backend
    without ``json_schema`` (a 400 naming ``response_format``, as vLLM and OpenAI word it)."""

    def __init__(self) -> None:
        self.probes: list[tuple[dict[str, str], str | None]] = []  # (headers, response_format type)
        self.lock = threading.Lock()

    def app(self) -> Starlette:
        async def completions(request: Request) -> Response:
            body = json.loads(await request.body())
            model = body.get("model") or "m"
            if request.headers.get("x-refusal-guard-probe") != "1":
                return JSONResponse(_completion("Sure.", model))
            kind = (body.get("response_format") or {}).get("type")
            with self.lock:
                self.probes.append((dict(request.headers), kind))
            if kind == "json_schema" and request.headers.get("x-route") == "legacy":
                return JSONResponse({"error": {"message": "response_format json_schema is not supported",
                                               "type": "invalid_request_error", "param": "response_format",
                                               "code": None}}, status_code=400)
            answer = {"will_refuse": False, "confidence": 4, "harm_rating": 1, "topic": "other"}
            return JSONResponse(_completion(json.dumps(answer), model))

        return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])

    def formats(self) -> list[str | None]:
        with self.lock:
            return [kind for _, kind in self.probes]


def _completion(content: str, model: str) -> dict:
    return {"id": "c", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def test_one_clients_routing_header_cannot_weaken_the_dialect_for_others():
    from guard.app import create_app
    from guard.settings import Settings

    state = DialectUpstream()
    with ServerThread(state.app()) as upstream:
        settings = Settings(upstream=upstream.url + "/v1", mode="sequential", datapoints=None,
                            upstream_check_interval=0, probe_timeout=5)
        with ServerThread(create_app(settings, registry=CollectorRegistry())) as proxy:
            response = chat(proxy.url, "one request", {"x-route": "legacy"})
            assert response.status_code == 200
            # its own probe was refused (a 400 for its own call: its request alone fails open); the
            # check probe, without its header, was not: no step down
            assert state.formats() == ["json_schema", "json_schema"]
            assert "x-route" not in state.probes[1][0]
            assert response.headers["x-refusal-guard-prediction"] == "unknown"
            for i in range(3):
                victim = chat(proxy.url, f"victim {i}")
                assert victim.headers["x-refusal-guard-prediction"] == "comply"
            assert state.formats()[2:] == ["json_schema"] * 3  # everyone else keeps the best dialect


# --- row 10: model label slots ----------------------------------------------------------------------

def model_series(url: str) -> dict[str, float]:
    """``refusal_guard_requests_total`` summed per ``model`` label value."""
    out: dict[str, float] = {}
    for (name, labels), value in metric_samples(url).items():
        if name == "refusal_guard_requests_total":
            model = dict(labels).get("model")
            if model is not None:
                out[model] = out.get(model, 0) + value
    return out


def test_junk_model_names_take_no_label_slot(start_proxy, script):
    """20 made-up names the upstream answers anyway (it echoes any model name back), then the model
    it lists: the junk is counted as ``other`` and creates no series; the real model gets its label."""
    script.models = ["scripted"]
    proxy = start_proxy(mode="sequential", metric_models_seen=20)
    for i in range(20):
        response = chat(proxy.url, f"junk {i}", model=f"junk-{i}")
        assert response.status_code == 200 and response.json()["model"] == f"junk-{i}"  # served, echoed
        model_series(proxy.url)  # a scrape after each: a junk slot would be admitted at once
    series = model_series(proxy.url)
    assert not [m for m in series if m.startswith("junk")]
    assert series["other"] == 20
    # a miss asks the upstream for a fresh listing, at most once a minute: junk cannot flood /models
    assert script.calls["models"] == 1

    def labelled() -> bool:
        chat(proxy.url, "a real question", model="scripted")
        return model_series(proxy.url).get("scripted", 0) >= 1

    eventually(labelled, what="the listed model counted under its own label")
    series = model_series(proxy.url)
    assert not [m for m in series if m.startswith("junk")]
    before = series["scripted"]
    chat(proxy.url, "another", model="scripted")
    assert model_series(proxy.url)["scripted"] == before + 1


def test_a_listed_model_takes_a_slot_and_an_unlisted_one_never_does(start_proxy, script):
    script.models = ["alpha", "beta"]
    proxy = start_proxy(mode="sequential", metric_models_seen=1)
    assert httpx.get(proxy.url + "/readyz?upstream=1").status_code == 200  # the check applies the listing
    chat(proxy.url, "q", model="beta")  # listed: takes the one slot (pending until a scrape)
    model_series(proxy.url)
    chat(proxy.url, "q", model="beta")
    chat(proxy.url, "q", model="alpha")  # listed, but the slot is taken
    chat(proxy.url, "q", model="gamma")  # not listed
    series = model_series(proxy.url)
    assert series.get("beta") == 1 and "alpha" not in series and "gamma" not in series
    assert series["other"] == 3


def test_misses_ask_for_a_listing_at_most_once_a_period():
    from guard.live.model_labels import ModelLabels

    now, calls, created = [0.0], [], []
    labels = ModelLabels((), 5, created.append, refresh_every=60, clock=lambda: now[0])
    labels.refresh = lambda: calls.append(now[0])
    for i in range(100):
        assert labels.label(f"junk-{i}") == "other"
    now[0] = 59.0
    labels.label("junk-x")
    now[0] = 60.0
    labels.label("junk-y")
    assert calls == [0.0, 60.0] and created == ["other"]  # 102 misses, two listings, no junk series
    labels.listed(["real", 7, None, {"id": "x"}, "be/ta v2"])  # what is not a name is ignored; names cleaned
    assert labels.label("be/ta_v2") == "other" and created[-1] == "be/ta_v2"  # admitted, pending a scrape
    labels.scraped()
    assert labels.label("be/ta_v2") == "be/ta_v2" and len(calls) == 2  # a hit asks for nothing
