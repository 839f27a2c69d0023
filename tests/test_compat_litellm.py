"""LiteLLM with the guard, both orders of examples/litellm, as the README there writes them.

Order A (LiteLLM in front): ``refusal-guard serve --upstream <model server>/v1`` as a process,
and the litellm SDK reading ``config.yaml``'s ``model_list`` (only the host of ``api_base``
replaced by the test's port), plus litellm's direct calls compared direct vs guarded. The
LiteLLM *proxy* itself is not run: its ``litellm[proxy]`` extra needs the ``litellm-proxy``
package, which this machine's package index lacks; its model calls are these SDK calls.
Order B (guard in front): ``REFUSAL_GUARD_UPSTREAM_API_KEY=$LITELLM_MASTER_KEY refusal-guard
serve --upstream <litellm>/v1`` with a recording upstream standing in for LiteLLM, and
``examples/client.py`` run as the README runs it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.fault_upstream import ProxyProcess, clean_env
from tests.recording_upstream import REPLY, Recorder, build_recording_upstream
from tests.servers import ServerThread

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "litellm"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def litellm(monkeypatch):
    """The litellm SDK (the compat extra); orders' guard command lines are tested without it."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of the cost map from the network
    return pytest.importorskip("litellm", reason="install the compat extra to test the litellm SDK")


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def upstream(recorder) -> Iterator[ServerThread]:
    with ServerThread(build_recording_upstream(recorder)) as server:
        yield server


def _guard(upstream_url: str, tmp_path: Path, env: dict[str, str] | None = None) -> ProxyProcess:
    return ProxyProcess(upstream_url, tmp_path, "--datapoints", str(tmp_path / "dp.sqlite3"), env=env).start()


def test_order_a_litellm_sdk_with_config_yaml_in_front_of_the_guard(litellm, upstream, recorder, tmp_path,
                                                                    monkeypatch):
    guard = _guard(upstream.url + "/v1", tmp_path)  # refusal-guard serve --upstream http://llama:8000/v1
    try:
        config = yaml.safe_load((EXAMPLES / "config.yaml").read_text())
        entry = config["model_list"][0]
        assert entry["litellm_params"]["api_base"] == "http://refusal-guard:8080/v1"
        entry["litellm_params"]["api_base"] = guard.url + "/v1"
        monkeypatch.setenv("REFUSAL_GUARD_UPSTREAM_KEY", "sk-local")
        router = litellm.Router(model_list=config["model_list"], num_retries=0)
        answer = router.completion(model="smollm2", messages=MESSAGES)
        assert answer.choices[0].message.content == REPLY
        streamed = "".join(c.choices[0].delta.content or "" for c in router.completion(
            model="smollm2", messages=MESSAGES, stream=True))
        assert streamed == REPLY
        generations = [s for s in recorder.requests if s.path == "/v1/chat/completions"]
        assert len(generations) == 2 and {json.loads(s.body)["model"] for s in generations} == {"smollm2"}
        assert generations[0].headers["authorization"] == "Bearer sk-local"
        assert recorder.probes  # the guard asked its probe before each answer
    finally:
        guard.terminate()
    assert "upstream http://127.0.0.1" in guard.log_path.read_text() and "answers" in guard.log_path.read_text()


def test_order_a_as_the_old_readme_had_it_is_named_at_start(upstream, tmp_path):
    guard = _guard(upstream.url, tmp_path)  # no /v1: every forwarded call would 404
    guard.terminate()
    assert "does the upstream URL end in /v1?" in guard.log_path.read_text()


@pytest.mark.parametrize("call", ["completion", "stream", "embedding", "text_completion"])
def test_litellm_direct_and_guarded_agree(litellm, upstream, recorder, tmp_path, call):
    guard = _guard(upstream.url + "/v1", tmp_path)

    def run(base: str) -> object:
        common = dict(api_base=base, api_key="sk-test", num_retries=0)
        if call == "completion":
            return litellm.completion(model="openai/m", messages=MESSAGES, **common).choices[0].message.content
        if call == "stream":
            return "".join(c.choices[0].delta.content or "" for c in litellm.completion(
                model="openai/m", messages=MESSAGES, stream=True, **common))
        if call == "embedding":
            return [d["embedding"] for d in litellm.embedding(model="openai/e", input=["a", "b"], **common).data]
        return litellm.text_completion(model="text-completion-openai/m", prompt="The capital", **common).choices[0].text

    try:
        recorder.clear()
        direct = run(upstream.url + "/v1")
        direct_bodies = [(s.path, s.body) for s in recorder.requests]
        recorder.clear()
        guarded = run(guard.url + "/v1")
        guarded_bodies = [(s.path, s.body) for s in recorder.requests]
    finally:
        guard.terminate()
    assert guarded == direct and guarded_bodies == direct_bodies and len(direct_bodies) == 1
    assert direct in (REPLY, [[0.25, -0.5, 0.0], [0.25, -0.5, 1.0]])


def test_order_b_guard_in_front_sends_litellms_key_and_client_py_runs(upstream, recorder, tmp_path):
    # REFUSAL_GUARD_UPSTREAM_API_KEY=$LITELLM_MASTER_KEY refusal-guard serve --upstream http://litellm:4000/v1
    guard = _guard(upstream.url + "/v1", tmp_path, env={"REFUSAL_GUARD_UPSTREAM_API_KEY": "sk-litellm-dev"})
    try:
        # REFUSAL_GUARD_MODEL=gpt-4o-mini python examples/client.py
        env = {**clean_env(), "REFUSAL_GUARD_URL": guard.url + "/v1", "REFUSAL_GUARD_MODEL": "gpt-4o-mini"}
        done = subprocess.run([sys.executable, str(ROOT / "examples" / "client.py")], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    finally:
        guard.terminate()
    assert done.returncode == 0, done.stderr[-2000:]
    assert REPLY in done.stdout
    seen = recorder.requests + recorder.probes
    assert seen and {s.headers["authorization"] for s in seen} == {"Bearer sk-litellm-dev"}
    assert {json.loads(s.body).get("model") for s in recorder.requests if s.method == "POST"} == {"gpt-4o-mini"}
    config = yaml.safe_load((EXAMPLES / "config.guard-in-front.yaml").read_text())
    assert "gpt-4o-mini" in {m["model_name"] for m in config["model_list"]}
