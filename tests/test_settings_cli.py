"""Settings precedence (flags > env > file > defaults) and the `serve` command as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from guard.settings import ConfigFileError, Mode, load_settings
from tests.servers import free_port, spawn, stop_group, wait_http


@pytest.fixture
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("REFUSAL_GUARD_"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path: Path, clean_env):
    config = tmp_path / "guard.yaml"
    config.write_text("upstream: http://file:1/v1\nport: 9001\nprobe_timeout: 3.5\nmode: shadow\n")
    clean_env.setenv("REFUSAL_GUARD_PORT", "9002")
    clean_env.setenv("REFUSAL_GUARD_MODE", "parallel")
    settings = load_settings({"mode": "off", "host": None}, config)
    assert settings.mode is Mode.OFF  # flag beats env and file
    assert settings.port == 9002  # env beats file
    assert settings.probe_timeout == 3.5  # file beats default
    assert settings.upstream == "http://file:1/v1"
    assert settings.host == "127.0.0.1"  # default; a flag given as None does not count


def test_toml_config_and_topics_from_env(tmp_path: Path, clean_env):
    config = tmp_path / "guard.toml"
    config.write_text('upstream = "http://toml:2/v1"\nworkers = 2\n')
    clean_env.setenv("REFUSAL_GUARD_TOPICS", "weapons, fraud")
    settings = load_settings({}, config)
    assert settings.workers == 2 and settings.topics == ("weapons", "fraud")


def test_bad_config_is_a_clear_error(tmp_path: Path, clean_env):
    bad = tmp_path / "guard.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigFileError, match="mapping"):
        load_settings({}, bad)
    with pytest.raises(ConfigFileError, match="must end in"):
        load_settings({}, tmp_path / "guard.ini")
    with pytest.raises(ValueError, match="http"):
        load_settings({"upstream": "ftp://x"})


def test_serve_command_in_front_of_an_openai_compatible_server(upstream, script, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFUSAL_GUARD_")}
    proc = spawn(
        [sys.executable, "-m", "guard.cli", "serve", "--upstream", upstream.url + "/v1", "--port", str(port),
         "--mode", "off", "--datapoints", str(tmp_path / "dp.sqlite3")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-x", max_retries=0)
        answer = sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content == script.reply
        streamed = "".join(c.choices[0].delta.content or "" for c in sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True) if c.choices)
        assert streamed == script.reply
    finally:
        stop_group(proc)


def test_serve_rejects_invalid_settings_with_exit_2(clean_env):
    done = subprocess.run([sys.executable, "-m", "guard.cli", "serve", "--upstream", "nope"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and "invalid settings" in done.stderr


def test_max_concurrency_sheds_load_with_503(upstream, script, tmp_path):
    import concurrent.futures

    script.stall = 1.0
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFUSAL_GUARD_")}
    proc = spawn(
        [sys.executable, "-m", "guard.cli", "serve", "--upstream", upstream.url + "/v1", "--port", str(port),
         "--mode", "off", "--max-concurrency", "3", "--datapoints", str(tmp_path / "dp.sqlite3")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)

        def call(i: int) -> int:
            return httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=20,
                              json={"model": "m", "messages": [{"role": "user", "content": f"c{i}"}]}).status_code

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(call, range(8)))
        assert statuses.count(200) >= 1 and statuses.count(503) >= 1
        assert set(statuses) <= {200, 503}
    finally:
        stop_group(proc)
