"""The ``refusal-guard`` console script: serve | classify | collect | calibrate | export | up.

Each subcommand's options live next to the code they drive; this module only assembles
them. ``serve`` derives one flag per setting from :class:`~guard.settings.Settings`, so a
setting has the same name as a flag (``--probe-timeout``), an environment variable
(``REFUSAL_GUARD_PROBE_TIMEOUT``) and a config-file key (``probe_timeout``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import typing
from collections.abc import Sequence
from enum import Enum
from pathlib import Path

from pydantic import ValidationError

from guard.settings import ConfigFileError, Settings, load_settings, settings_to_json

RESOLVED_SETTINGS_ENV = "REFUSAL_GUARD_RESOLVED_SETTINGS"


def _flag_type(annotation: object) -> tuple[type | None, list[str] | None]:
    """The argparse type and choices for a settings field, or (None, None) for a bool."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if typing.get_origin(annotation) in (typing.Union, type(int | None)) and args else annotation
    if base is bool:
        return None, None
    if isinstance(base, type) and issubclass(base, Enum):
        return str, [m.value for m in base]
    if typing.get_origin(base) is typing.Literal:
        return str, list(typing.get_args(base))
    if base in (int, float):
        return base, None  # type: ignore[return-value]
    return str, None  # str, Path, SecretStr, tuples (comma-separated)


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the proxy in front of an OpenAI-compatible upstream",
        description="Precedence: flags > REFUSAL_GUARD_* environment > --config file > defaults.",
    )
    parser.add_argument("--config", type=Path, default=os.environ.get("REFUSAL_GUARD_CONFIG"),
                        help="YAML or TOML file of settings (env: REFUSAL_GUARD_CONFIG)")
    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind, choices = _flag_type(info.annotation)
        help_text = (info.description or "") + f" (env: REFUSAL_GUARD_{name.upper()})"
        if kind is None:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=kind, choices=choices, default=None, help=help_text)
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    flags = {name: getattr(args, name) for name in Settings.model_fields}
    try:
        settings = load_settings(flags, args.config)
    except (ValidationError, ConfigFileError) as exc:
        print(f"refusal-guard: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    from guard.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    # through the configured logging, so that with log_format json every line is JSON
    logging.getLogger("refusal_guard").log(*check_upstream_at_start(settings))
    common = uvicorn_options(settings)
    if settings.workers == 1:
        from guard.app import create_app

        uvicorn.run(create_app(settings), **common)
        return 0
    # Several workers: each process rebuilds the same settings and shares one metrics directory.
    os.environ[RESOLVED_SETTINGS_ENV] = settings_to_json(settings)
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="refusal-guard-metrics-"))
    uvicorn.run("guard.app:create_app_from_environment", factory=True, workers=settings.workers, **common)
    return 0


def uvicorn_options(settings: Settings) -> dict[str, typing.Any]:
    """The uvicorn options ``serve`` runs with (one place, so tests serve with exactly these)."""
    return dict(
        host=settings.host,
        port=settings.port,
        timeout_keep_alive=int(settings.keepalive_timeout),  # must outlive the load balancer's (docs/operations.md)
        timeout_graceful_shutdown=int(settings.shutdown_grace),
        h11_max_incomplete_event_size=settings.max_header_bytes,
        limit_concurrency=settings.max_concurrency,
        log_level=settings.log_level,
        log_config=None,  # uvicorn's loggers propagate to the root logger configured in run_serve
        # uvicorn's access lines carry paths, query strings (keys: ?api-key=...) and client addresses;
        # guard.logs writes its own (json), and redacts query strings in every other line.
        access_log=False,
    )


def check_upstream_at_start(settings: Settings) -> tuple[int, str]:
    """(log level, one plain line) on whether the upstream answers ``GET /models``, for the operator.

    Serving starts either way (the upstream may come up later; ``/readyz?upstream=1`` and the
    ``refusal_guard_upstream_up`` metric follow it), but a wrong base URL is named at once.
    """
    import httpx

    shown = str(httpx.URL(settings.upstream).copy_with(userinfo=b""))  # never print credentials in the URL
    url = shown + "/models"
    headers = {"authorization": f"Bearer {settings.upstream_api_key.get_secret_value()}"} if settings.upstream_api_key else {}
    try:
        status = httpx.get(settings.upstream + "/models", headers=headers, timeout=min(settings.connect_timeout, 5.0)).status_code
    except httpx.HTTPError as exc:
        return logging.WARNING, f"upstream {shown} not reachable yet ({type(exc).__name__}); serving anyway"
    if status == 404:
        return (logging.WARNING, f"GET {url} answered 404: does the upstream URL end in /v1? "
                f"(e.g. --upstream {shown}/v1); every forwarded call will 404 until it does")
    if status in (401, 403):
        return (logging.WARNING, f"GET {url} answered {status}: the upstream wants a key "
                "(--upstream-api-key / REFUSAL_GUARD_UPSTREAM_API_KEY, or clients' own Authorization headers)")
    if status >= 400:
        return logging.WARNING, f"GET {url} answered {status}"
    return logging.INFO, f"upstream {shown} answers (GET /models: {status})"


def add_export_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="export the proxy's datapoint log (SQLite or PostgreSQL) as JSONL")
    parser.add_argument("--db", default="refusal-guard-datapoints.sqlite3",
                        help="the datapoint database: a SQLite file or a postgresql:// URL (the `datapoints` setting)")
    parser.add_argument("--out", type=Path, default=None, help="JSONL file to write (default: stdout)")
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from calibration.postgres import is_postgres_url, redact_url, scrub

    if is_postgres_url(args.db):
        from guard.stores.postgres import export_postgres_jsonl

        def export(out: typing.TextIO) -> int:
            try:
                return export_postgres_jsonl(args.db, out)
            except Exception as exc:  # connection refused, authentication, no table...
                raise _ExportError(f"cannot read {redact_url(args.db)}: {type(exc).__name__}: "
                                   f"{scrub(str(exc), args.db)}") from None
    else:
        from guard.stores.recorder import export_jsonl

        if not Path(args.db).is_file():
            print(f"refusal-guard export: no database at {args.db}", file=sys.stderr)
            return 2

        def export(out: typing.TextIO) -> int:
            return export_jsonl(Path(args.db), out)
    try:
        if args.out is None:
            count = export(sys.stdout)
        else:
            with args.out.open("w", encoding="utf-8") as out:
                count = export(out)
    except _ExportError as exc:
        print(f"refusal-guard export: {exc}", file=sys.stderr)
        return 2
    print(f"exported {count} datapoints", file=sys.stderr)
    return 0


class _ExportError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    from calibration.cli import add_calibrate_parser
    from guard.ops.classify import add_classify_parser
    from guard.ops.collect import add_collect_parser
    from guard.ops.up import add_up_parser

    parser = argparse.ArgumentParser(prog="refusal-guard", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(subparsers)
    add_up_parser(subparsers)
    add_classify_parser(subparsers)
    add_collect_parser(subparsers)
    add_calibrate_parser(subparsers)
    add_export_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call is noise, and carries URLs
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
