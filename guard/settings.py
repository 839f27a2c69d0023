"""Settings for the proxy, resolved as flags > environment > config file > defaults.

Every field can be set by a command-line flag, by an environment variable named
``REFUSAL_GUARD_<FIELD>`` (upper case), or by a key in a YAML or TOML config file.
:func:`load_settings` is the one place that applies that precedence, so the CLI, the
multi-worker factory and the tests all resolve settings the same way.
"""

from __future__ import annotations

import json
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import yaml

from calibration.datapoints import parse_duration
from calibration.postgres import is_postgres_url
import re

from pydantic import BeforeValidator, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict

ENV_PREFIX = "REFUSAL_GUARD_"

DEFAULT_TOPICS: tuple[str, ...] = (
    "weapons",
    "drugs",
    "hacking",
    "self_harm",
    "hate_speech",
    "fraud",
    "privacy",
    "illegal_activities",
    "manipulation",
    "violence",
)


class Mode(StrEnum):
    """How the probe relates to generation (see README, "Modes")."""

    SEQUENTIAL = "sequential"
    PARALLEL = "parallel"
    SHADOW = "shadow"
    OFF = "off"

    @property
    def enforcing(self) -> bool:
        """Whether the policy's action is carried out (sequential, parallel); else every request passes."""
        return self in (Mode.SEQUENTIAL, Mode.PARALLEL)

    def applied(self, action: str) -> str:
        """The action carried out for a request the policy routed to ``action``."""
        return action if self.enforcing else "pass"


class OnProbeFailure(StrEnum):
    PASS = "pass"
    REVIEW = "review"
    BLOCK = "block"


#: Seconds, given as a number or a duration such as "30d", "12h", "15m".
Duration = Annotated[float, BeforeValidator(lambda v: parse_duration(v) if isinstance(v, str) else v)]


#: What an inbound API key's name (the datapoints' ``client``) may be made of.
_KEY_NAME = re.compile(r"[A-Za-z0-9._@+\-]{1,64}")


#: POST routes under /v1 that generate from input the probe never sees (see ``refused_routes``): an
#: Anthropic-style API, deployment-path aliases of chat completions (LiteLLM, Azure-style), batches run
#: from an uploaded file, Assistants runs.
REFUSED_ROUTES = ("/v1/messages", "/v1/engines", "/v1/openai", "/v1/deployments", "/v1/batches", "/v1/threads")


class Settings(BaseSettings):
    """All knobs of one proxy process. Defaults suit a single replica on loopback."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    # --- where to listen and what to front ---------------------------------------------
    upstream: str = Field(description="Base URL of the OpenAI-compatible upstream, e.g. http://127.0.0.1:8000/v1")
    upstream_api_key: SecretStr | None = Field(
        default=None, description="If set, sent upstream instead of the client's Authorization header."
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=64)

    # --- limits and timeouts -------------------------------------------------------------
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024, description=(
        "Largest body of a guarded request (read whole to be probed): 32 MiB fits a 20 MB image as base64. "
        "Forwarded routes stream their bodies and have no limit of their own."))
    connect_timeout: float = Field(default=5.0, gt=0)
    read_timeout: float = Field(default=120.0, gt=0, description="Longest silence between upstream bytes.")
    total_timeout: float = Field(default=600.0, gt=0, description="Longest a whole upstream exchange may take.")
    pool_max_connections: int = Field(default=512, ge=1)
    pool_keepalive_expiry: float = Field(default=4.0, gt=0, description=(
        "Idle upstream connections are closed after this; keep it below the upstream's own idle timeout."))
    keepalive_timeout: float = Field(default=75.0, gt=0, description=(
        "Idle client connections are closed after this. Keep it above the idle timeout of whatever sends to the "
        "guard (AWS ALB 60 s, nginx upstream keepalive 60 s; GCP's load balancer needs 620), so the client "
        "side closes first and never sends on a connection the guard is closing."))
    max_concurrency: int | None = Field(
        default=None, ge=1, description="Connections+requests served at once; beyond it, 503 (load shedding)."
    )
    max_header_bytes: int = Field(default=64 * 1024, ge=1024, description="Largest request head (line + headers).")
    max_response_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, description=(
        "Largest upstream answer relayed; a longer one is cut (502, or an in-band error event in a stream) "
        "and counted as upstream_errors_total{reason=\"too_large\"}."))
    upstream_check_interval: float = Field(default=15.0, ge=0, description=(
        "Seconds between upstream health checks (metric refusal_guard_upstream_up); 0: only on /readyz?upstream=1."))
    shutdown_grace: float = Field(default=20.0, ge=0, description="Seconds in-flight requests get on SIGTERM.")

    # --- the probe and routing -----------------------------------------------------------
    mode: Mode = Mode.SEQUENTIAL
    policy: Path | None = Field(default=None, description="Policy JSON written by `refusal-guard calibrate`.")
    on_probe_failure: OnProbeFailure = OnProbeFailure.PASS
    probe_timeout: float = Field(default=2.0, gt=0)
    probe_model: str | None = Field(default=None, description=(
        "Model for the probe; default: the request's model. Set it so that no client's model name is used for the probe."))
    probe_max_tokens: int = Field(default=96, ge=16)
    probe_structured_output: Literal["auto", "json_schema", "json_object", "none"] = "auto"
    probe_context: Literal["last_user", "conversation"] = Field(default="conversation", description=(
        "What the probe sees: the whole conversation with its tools (within probe_context_chars), or only the "
        "last user turn (weaker: a harmful system message or earlier turn is not assessed)."))
    probe_context_chars: int = Field(default=24_000, ge=256, description=(
        "Budget of the probe's view; the last user turn is kept whole, the middle of the conversation is cut."))
    probe_unknown_parts: Literal["mark", "skip", "fail"] = Field(default="mark", description=(
        "Content parts without text the probe can read (images, audio...): shown as a marker, left out, "
        "or the probe fails (on_probe_failure applies)."))
    probe_dialect_retry: float = Field(default=600.0, gt=0, description=(
        "Seconds before a model that refused a structured-output dialect is offered the best one again."))
    probe_cache_size: int = Field(default=10_000, ge=0)
    probe_cache_ttl: float = Field(default=600.0, gt=0)
    topics: Annotated[tuple[str, ...], NoDecode] = DEFAULT_TOPICS
    refusal_message: str = "I can't help with that request."
    block_response: Literal["completion", "error"] = "completion"
    review_upstream: str | None = None
    review_upstream_api_key: SecretStr | None = None
    review_webhook: str | None = None
    admin_token: SecretStr | None = None
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = Field(default=(), description=(
        "If non-empty, clients must send one of these as a bearer token. A mapping name: key (a YAML/TOML "
        "table, or a JSON object in the environment) names them; datapoints record the name as `client`."))
    api_key_names: Annotated[tuple[str, ...], NoDecode] = Field(default=(), description=(
        "Names of api_keys, in order (set for you when api_keys is a mapping); default key-1, key-2, ..."))
    refused_routes: Annotated[tuple[str, ...], NoDecode] = Field(default=REFUSED_ROUTES, description=(
        "Paths under /v1 (prefixes, whole segments) where a POST makes the upstream generate from input the "
        "probe never sees (Anthropic-style /v1/messages, deployment aliases of chat completions, batches, "
        "Assistants runs): refused with a 403 instead of forwarded unguarded. Empty: forward them."))
    forward_client_key: bool = Field(default=False, description=(
        "With api_keys set, also forward the client's Authorization (its key for the guard) upstream."))
    circuit_failures: int = Field(default=5, ge=1, description=(
        "Upstream-health probe failures in a row (connect, timeout, 5xx) that open one upstream+model's circuit."))
    circuit_cooldown: float = Field(default=30.0, gt=0)

    # --- ground truth, datapoints and live metrics ---------------------------------------
    datapoints: Path | SecretStr | None = Field(default=Path("refusal-guard-datapoints.sqlite3"), description=(
        "Datapoint log: a SQLite file, or a postgresql:// URL (needs the postgres extra; a secret: never logged)."))
    datapoint_max_age: Duration | None = Field(default=None, gt=0, description=(
        "Retention: delete datapoints older than this (seconds, or 30d, 12h...); default: keep."))
    datapoint_max_rows: int | None = Field(default=None, ge=1, description=(
        "Retention: keep at most this many datapoints (the newest); default: no limit."))
    log_prompts: bool = False
    prompt_hash_key: SecretStr | None = Field(default=None, description=(
        "Key of the HMAC prompt hashes in datapoints; default: generated and kept in prompt_hash_key_file."))
    prompt_hash_key_file: Path | None = Field(default=None, description=(
        "Where a generated prompt-hash key is kept; default: <datapoints>.key beside the log."))
    strict_refusal: bool = False
    datapoint_queue_size: int = Field(default=10_000, ge=1)
    window_size: int = Field(default=500, ge=10)
    drift_alpha: float = Field(default=0.01, gt=0, lt=1)
    drift_horizon: int = Field(default=100_000, ge=100, description=(
        "Scored requests (fleet-wide, since the policy loaded) within which P(any false drift alarm) <= drift_alpha."))
    metric_models: Annotated[tuple[str, ...], NoDecode] = Field(default=(), description=(
        "Models that always get their own `model` label on the request and outcome counters (e.g. a,b)."))
    metric_models_seen: int = Field(default=20, ge=0, description=(
        "Besides metric_models, label at most this many further models per process (the first seen that the "
        "upstream lists in GET /models); every other model is counted as `other`."))
    judge_url: str | None = Field(default=None, description=(
        "LLM judge: an OpenAI-compatible API root (the upstream itself will do). It labels a random "
        "judge_fraction of answers; calibrate and the live gauges correct the SDT figures with those labels."))
    judge_model: str | None = None
    judge_api_key: SecretStr | None = Field(default=None, description=(
        "The judge endpoint's key (not taken from upstream_api_key, even when judge_url is the upstream)."))
    judge_fraction: float = Field(default=0.0, ge=0, le=1, description=(
        "Share of answers the judge labels: a fresh random draw per request (the guard's own; nothing a client "
        "sends steers it)."))
    judge_timeout: float = Field(default=30.0, gt=0, description=(
        "Longest one judge call may take; past it the audit counts as failed and the datapoint is logged "
        "without judge_label."))
    judge_max_pending: int = Field(default=32, ge=1, description=(
        "Audits waiting for the judge at once. A request sampled beyond it is logged at once without "
        "judge_label (judge result `skipped`), so a slow judge holds neither memory nor more than this many "
        "of the connections the proxy shares with its upstream (pool_max_connections)."))

    # --- process logs ----------------------------------------------------------------------
    log_format: Literal["text", "json"] = Field(default="text", description=(
        "text, or json: one JSON object a line, plus one access-log line per request (never prompt text)."))
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    otlp_endpoint: str | None = Field(default=None, description=(
        "OpenTelemetry: export spans over OTLP/HTTP here, e.g. http://collector:4318/v1/traces (needs the otel extra)."))
    otel_service_name: str = "refusal-guard"

    @field_validator("upstream", "review_upstream", "review_webhook", "judge_url", "otlp_endpoint")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/") if value else value

    @field_validator("datapoints", mode="before")
    @classmethod
    def _database_url_is_secret(cls, value: Any) -> Any:
        # A database URL may carry a password: hold it as a secret, never as a file name.
        if isinstance(value, str) and is_postgres_url(value):
            return SecretStr(value)
        if isinstance(value, str) and "://" in value:
            raise ValueError("must be a file path or a postgresql:// URL")
        if isinstance(value, str):
            return Path(value) if value.strip() else None
        return value

    @field_validator("upstream_api_key", "review_upstream_api_key", "admin_token", "judge_api_key",
                     "prompt_hash_key", mode="before")
    @classmethod
    def _empty_secret_is_none(cls, value: Any) -> Any:
        # An empty token must mean "not set", never "the empty string is the password".
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return value

    @field_validator("prompt_hash_key")
    @classmethod
    def _long_enough_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters (e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)")
        return value

    @model_validator(mode="before")
    @classmethod
    def _named_api_keys(cls, data: Any) -> Any:
        # api_keys as a mapping {name: key}: split into the keys and their names (api_key_names).
        if not isinstance(data, dict):
            return data
        keys = data.get("api_keys")
        if isinstance(keys, str) and keys.lstrip().startswith("{"):
            keys = json.loads(keys)
        if isinstance(keys, Mapping):
            if data.get("api_key_names"):
                raise ValueError("give api_keys as a mapping name: key, or api_key_names, not both")
            kept = {str(name): key for name, key in keys.items()
                    if (key.get_secret_value() if isinstance(key, SecretStr) else str(key or "")).strip()}
            data = {**data, "api_keys": list(kept.values()), "api_key_names": list(kept)}
        return data

    @model_validator(mode="after")
    def _api_key_names_match(self) -> "Settings":
        names = self.api_key_names
        if names and len(names) != len(self.api_keys):
            raise ValueError(f"api_key_names has {len(names)} names for {len(self.api_keys)} api_keys")
        for name in names:
            if not _KEY_NAME.fullmatch(name):
                raise ValueError(f"api key name {name!r} must be 1-64 characters of [A-Za-z0-9._@+-]")
        if len(set(names)) != len(names):
            raise ValueError("api key names must be unique")
        return self

    def api_key_name(self, index: int) -> str:
        """The name of ``api_keys[index]``: its configured name, else ``key-<index + 1>``."""
        return self.api_key_names[index] if self.api_key_names else f"key-{index + 1}"

    @field_validator("topics", "api_keys", "api_key_names", "metric_models", "refused_routes", mode="before")
    @classmethod
    def _split_topics(cls, value: Any) -> Any:
        # Flags and environment variables arrive as strings: accept "a,b,c" or a JSON list.
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return tuple(t.strip() for t in value.split(",") if t.strip())
        return value

    @field_validator("api_keys")
    @classmethod
    def _no_empty_keys(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        return tuple(k for k in value if k.get_secret_value().strip())

    @field_validator("refused_routes")
    @classmethod
    def _routes_under_v1(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for route in value:
            if not route.startswith("/v1/") or route.endswith("/") or "//" in route or "/." in route:
                raise ValueError(f"refused_routes: {route!r} is not a normal path under /v1 (e.g. /v1/messages)")
        return value

    @field_validator("topics")
    @classmethod
    def _topics_are_labels(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for topic in value:
            if not topic.replace("_", "").isalnum() or topic in ("other", "all"):
                raise ValueError(f"topic {topic!r} must be a plain word (letters, digits, _), not 'other' or 'all'")
        return value


class ConfigFileError(ValueError):
    """The config file could not be read or is not a mapping."""


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file into a flat mapping of settings."""
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigFileError(f"config file {path} must end in .yaml, .yml or .toml")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigFileError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        if path.suffix == ".toml":
            data: Any = tomllib.loads(text)
        else:
            data = yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigFileError(f"config file {path} is not valid: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigFileError(f"config file {path} must hold a mapping of settings")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def load_settings(
    flags: Mapping[str, Any] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Resolve settings: flags > environment > config file > defaults.

    ``flags`` holds only the options the user actually gave (None means "not given").
    """
    file_values = read_config_file(config_file) if config_file else {}
    env_values = EnvSettingsSource(Settings)()
    given_flags = {k: v for k, v in (flags or {}).items() if v is not None}
    return Settings(**{**file_values, **env_values, **given_flags})


def settings_to_json(settings: Settings) -> str:
    """Serialise settings (secrets included) so that worker processes can rebuild them."""
    data = settings.model_dump(mode="json")
    for name, value in settings:
        if isinstance(value, SecretStr):
            data[name] = value.get_secret_value()
        elif isinstance(value, tuple) and value and isinstance(value[0], SecretStr):
            data[name] = [v.get_secret_value() for v in value]
    return json.dumps(data)
