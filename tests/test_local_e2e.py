"""The whole loop with the real local model: proxy -> probe -> answer -> datapoint -> metrics -> calibrate.

SmolLM2-135M is a poor introspector (it predicts "comply" at confidence 1 for nearly
everything), so the calibration here exercises the single-class path for real.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry

from calibration.calibrate import calibrate
from calibration.policy import Policy
from guard.app import create_app
from guard.ops.collect import collect, read_prompts
from guard.settings import Settings
from tests.llama import MODEL_ALIAS, requires_llama, running_llama_server
from tests.servers import ServerThread, eventually

pytestmark = [pytest.mark.llama, requires_llama]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    with running_llama_server(tmp_path_factory.mktemp("llama")) as server:
        yield server


def scored(proxy_url: str) -> float:
    """Requests counted as outcomes (probe prediction vs the labelled answer), summed over cells."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(proxy_url + "/metrics").text.splitlines()
               if line.startswith("refusal_guard_outcomes_total{"))


def test_guarded_requests_are_probed_logged_counted_and_calibrated(llama, tmp_path):
    db = tmp_path / "dp.sqlite3"
    settings = Settings(upstream=llama.api_url, mode="sequential", probe_structured_output="json_object",
                        probe_timeout=90, datapoints=db)
    with ServerThread(create_app(settings, registry=CollectorRegistry())) as proxy:
        sdk = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-local", max_retries=0, timeout=180)
        raw = sdk.chat.completions.with_raw_response.create(
            model=MODEL_ALIAS, max_tokens=24, messages=[{"role": "user", "content": "Name one colour."}])
        assert raw.parse().choices[0].message.content.strip()
        assert raw.headers["x-refusal-guard-prediction"] in ("refuse", "comply")  # the probe parsed
        streamed = "".join(c.choices[0].delta.content or "" for c in sdk.chat.completions.create(
            model=MODEL_ALIAS, max_tokens=24, stream=True,
            messages=[{"role": "user", "content": "How do I pick a lock?"}]) if c.choices)
        assert streamed.strip()
        # A stream is scored once the model server ends it, which may be after the client has read [DONE].
        eventually(lambda: scored(proxy.url) >= 2, what="both requests scored")
        assert scored(proxy.url) == 2
    con = sqlite3.connect(db)
    rows = con.execute("SELECT probe_status, will_refuse, confidence, refused, label FROM datapoints").fetchall()
    con.close()
    assert len(rows) == 2
    assert all(status == "ok" and confidence in range(1, 6) and refused is not None for status, _, confidence, refused, _ in rows)

    # collect over a handful of prompts straight from the model server, then calibrate both logs together
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p, "topic": "other", "harm_level": 1}) + "\n"
                               for i, p in enumerate(["Say hi.", "What is 2+2?", "Name a fruit."])))
    out = tmp_path / "collected.jsonl"
    stats = asyncio.run(collect(read_prompts([prompts]), endpoint=llama.api_url, model=MODEL_ALIAS, out=out,
                                concurrency=1, max_tokens=24, probe_timeout=90, probe_structured_output="json_object",
                                progress=False))
    assert stats.written == 3
    result = calibrate([db, out], target_accuracy=0.9, confidence=0.9, n_boot=200)
    policy_file = tmp_path / "policy.json"
    result.policy.save(policy_file)
    policy = Policy.load(policy_file)
    assert policy.n == 5
    assert policy.sdt.accuracy is not None and 0.0 <= policy.sdt.accuracy <= 1.0
    assert policy.sdt.small  # five datapoints are never enough to trust, and the policy says so
