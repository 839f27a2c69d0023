"""``refusal-guard up``: the bundled local model and the proxy in front of it, in one command.

1. Starts ``python -m llama_cpp.server`` with SmolLM2-135M-Instruct on loopback
   (``--model-port``, default 8000 if free, else any free port), model name ``smollm2``.
2. Starts ``refusal-guard serve`` as a second process with ``--upstream`` set to that
   server's ``/v1``; everything else resolves as usual (flags > env > ``--config`` > defaults).
3. Waits until the proxy's ``/readyz?upstream=1`` answers 200, prints where to send requests, and
   runs until Ctrl-C or SIGTERM, then stops the proxy (it drains) and the model server.

The model server has answered one short completion before the proxy starts, so a build that
crashes in its matrix kernels is caught here, with the signal named, the log's tail and the
remedy (``guard.ops.local_model.crash_remedy``), not on a user's first request.

Both children run in their own sessions, so a terminal's Ctrl-C reaches only this process,
which then stops them in order; the kernel SIGTERMs them if this process dies without doing so.
Datapoints and logs go to a state directory (``--state-dir``, default
``$XDG_STATE_HOME/refusal-guard`` or ``~/.local/state/refusal-guard``), printed at start.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import httpx
from pydantic import ValidationError

from guard.ops.local_model import (
    MODEL_ALIAS,
    LocalModelError,
    LocalModelServer,
    die_with_parent,
    port_is_free,
    stop_process,
    tail,
)
from guard.settings import ENV_PREFIX, ConfigFileError, Settings, load_settings, read_config_file

DEFAULT_MODEL_PORT = 8000
DATAPOINTS_FILE = "datapoints.sqlite3"
# Settings whose proxy defaults do not suit the bundled model. They apply only when neither
# a flag, the environment nor the config file sets them.
LOCAL_DEFAULTS: dict[str, Any] = {
    # llama-cpp-python's server answers `json_schema` with a 500; `json_object` + schema works.
    "probe_structured_output": "json_object",
    # One probe takes seconds on a small CPU (see docs/local-model.md); 2 s would time out.
    "probe_timeout": 60.0,
}


def add_up_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "up",
        help="run the bundled local model (SmolLM2-135M) and the proxy in front of it",
        description=(__doc__ or "").split("\n\n")[0],
    )
    parser.add_argument("--host", default=None, help="proxy listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="proxy port (default 8080)")
    parser.add_argument("--model-port", type=int, default=None,
                        help=f"port of the local model server on 127.0.0.1 (default {DEFAULT_MODEL_PORT} if free)")
    parser.add_argument("--model-path", type=Path, default=None,
                        help="a GGUF file to serve instead of the bundled SmolLM2 (it is still called 'smollm2')")
    parser.add_argument("--model-threads", type=int, default=None, help="llama.cpp threads (default: CPU count - 1, at least 1)")
    parser.add_argument("--config", type=Path, default=os.environ.get("REFUSAL_GUARD_CONFIG"),
                        help="YAML or TOML settings file for the proxy (env: REFUSAL_GUARD_CONFIG)")
    parser.add_argument("--mode", choices=["sequential", "parallel", "shadow", "off"], default=None)
    parser.add_argument("--policy", type=Path, default=None, help="policy JSON from `refusal-guard calibrate`")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where datapoints and logs go (default $XDG_STATE_HOME/refusal-guard, "
                             "else ~/.local/state/refusal-guard)")
    parser.add_argument("--datapoints", type=Path, default=None,
                        help=f"SQLite file for datapoints (default: STATE_DIR/{DATAPOINTS_FILE})")
    parser.add_argument("--probe-timeout", type=float, default=None,
                        help=f"seconds (default here: {LOCAL_DEFAULTS['probe_timeout']:g}, the model is slow)")
    parser.add_argument("--probe-structured-output", choices=["auto", "json_schema", "json_object", "none"],
                        default=None, help="default here: json_object (what llama-cpp-python accepts)")
    parser.add_argument("--log-dir", type=Path, default=None, help="where the two log files go (default: STATE_DIR/logs)")
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for both servers")
    parser.set_defaults(func=run)


class _Stop:
    """Set by SIGINT/SIGTERM; the main loop polls it."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal: int | None = None

    def __call__(self, signum: int, frame: object) -> None:
        self.signal = signum
        self.event.set()


def default_state_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """``$XDG_STATE_HOME/refusal-guard``, else ``~/.local/state/refusal-guard`` (XDG base directories)."""
    base = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "refusal-guard"


def _proxy_flags(args: argparse.Namespace, upstream: str, state_dir: Path) -> dict[str, Any]:
    """The settings ``up`` passes as flags: the upstream, what the user gave, local defaults."""
    flags: dict[str, Any] = {"upstream": upstream}
    for name in ("host", "port", "mode", "policy", "datapoints", "probe_timeout", "probe_structured_output"):
        if getattr(args, name, None) is not None:
            flags[name] = getattr(args, name)
    file_values = read_config_file(args.config) if args.config else {}
    defaults = {**LOCAL_DEFAULTS, "datapoints": state_dir / DATAPOINTS_FILE}
    for name, value in defaults.items():
        if name not in flags and name not in file_values and ENV_PREFIX + name.upper() not in os.environ:
            flags[name] = value
    return flags


def _serve_command(flags: dict[str, Any], config: Path | None) -> list[str]:
    command = [sys.executable, "-m", "guard.cli", "serve"]
    if config is not None:
        command += ["--config", str(config)]
    for name, value in flags.items():
        command += ["--" + name.replace("_", "-"), str(value)]
    return command


def _banner(proxy_url: str, model_api: str, model_log: Path, proxy_log: Path, state_dir: Path,
            datapoints: Path | None) -> str:
    base = proxy_url + "/v1"
    return f"""
refusal-guard is up.
  proxy (send requests here)  {base}
  model name                  {MODEL_ALIAS}
  local model server          {model_api}   (SmolLM2-135M-Instruct via llama.cpp)
  state directory             {state_dir}
  datapoints                  {datapoints or "(off)"}
  logs                        {proxy_log}
                              {model_log}
  health / metrics            {proxy_url}/readyz   {proxy_url}/metrics

Calibration data: point `collect` at the model server, not the proxy (through the proxy its own
probe and generation calls would be probed and logged again):
  refusal-guard collect --endpoint {model_api} --model {MODEL_ALIAS} --probe-structured-output json_object \\
      --prompts examples/prompts/prompts.jsonl --out {state_dir / "collected.jsonl"}
  refusal-guard calibrate --datapoints {state_dir / "collected.jsonl"} --out {state_dir / "policy.json"}

Try it:
  curl -s {base}/chat/completions -H 'content-type: application/json' -d '{{"model": "{MODEL_ALIAS}", "messages": [{{"role": "user", "content": "Say hello"}}], "max_tokens": 32}}'

  from openai import OpenAI
  client = OpenAI(base_url="{base}", api_key="unused")
  print(client.chat.completions.create(model="{MODEL_ALIAS}", max_tokens=32,
        messages=[{{"role": "user", "content": "Say hello"}}]).choices[0].message.content)

Press Ctrl-C to stop both.
"""


def _wait_proxy_ready(url: str, proxy: subprocess.Popen, log: Path, deadline: float, stop: _Stop) -> None:
    with httpx.Client(timeout=5.0) as client:
        while not stop.event.is_set():
            code = proxy.poll()
            if code is not None:
                raise LocalModelError(f"the proxy exited with status {code} before it was ready; "
                                      f"last lines of {log}:\n{tail(log)}")
            try:
                if client.get(url + "/readyz?upstream=1").status_code == 200:  # the proxy and the model
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise LocalModelError(f"the proxy was not ready in time; last lines of {log}:\n{tail(log)}")
            stop.event.wait(0.1)


def run(args: argparse.Namespace) -> int:
    """Start the model server and the proxy, wait for a signal, stop both. Returns 0 on a clean stop."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the readiness polls are not news
    state_dir = (args.state_dir or default_state_dir()).expanduser().resolve()
    log_dir = args.log_dir or state_dir / "logs"
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"refusal-guard up: cannot create the state directory {state_dir}: {exc} (try --state-dir)",
              file=sys.stderr)
        return 2
    model_log, proxy_log = log_dir / "llama-server.log", log_dir / "proxy.log"

    if args.model_port is not None:
        model_port: int | None = args.model_port
    else:
        model_port = DEFAULT_MODEL_PORT if port_is_free("127.0.0.1", DEFAULT_MODEL_PORT) else None
    model = LocalModelServer(args.model_path, host="127.0.0.1", port=model_port, n_threads=args.model_threads,
                             log_path=model_log)
    # Resolve the proxy's settings now (upstream filled in below) so that a bad flag or config
    # file fails before the slow model start; the port is only known once the model is up.
    try:
        flags = _proxy_flags(args, f"http://127.0.0.1:{model_port or DEFAULT_MODEL_PORT}/v1", state_dir)
        settings: Settings = load_settings(flags, args.config)
    except (ValidationError, ConfigFileError) as exc:
        print(f"refusal-guard up: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    if settings.port == 0:
        print("refusal-guard up: give the proxy a fixed --port (0 is not supported here)", file=sys.stderr)
        return 2
    if not port_is_free(settings.host, settings.port):
        print(f"refusal-guard up: proxy port {settings.host}:{settings.port} is already in use (try --port)",
              file=sys.stderr)
        return 2

    stop = _Stop()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    proxy: subprocess.Popen | None = None
    status = 0
    try:
        deadline = time.monotonic() + args.startup_timeout
        print(f"State directory (datapoints, logs): {state_dir}", flush=True)
        print(f"Starting the local model server (SmolLM2-135M-Instruct, log: {model_log}); it must answer "
              "one short completion ...", flush=True)
        model.start(timeout=args.startup_timeout)
        if not stop.event.is_set():
            flags["upstream"] = model.api_url
            print(f"Model server ready at {model.api_url} (answered a first completion); starting the proxy "
                  f"(log: {proxy_log}) ...", flush=True)
            with open(proxy_log, "ab") as log:
                proxy = subprocess.Popen(_serve_command(flags, args.config), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent)
            host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
            proxy_url = f"http://{host}:{settings.port}"
            _wait_proxy_ready(proxy_url, proxy, proxy_log, deadline, stop)
        if not stop.event.is_set():
            print(_banner(proxy_url, model.api_url, model_log, proxy_log, state_dir, settings.datapoints), flush=True)
        while proxy is not None and not stop.event.wait(0.5):
            if (code := proxy.poll()) is not None:
                print(f"refusal-guard up: the proxy exited with status {code}; last lines of {proxy_log}:\n"
                      f"{tail(proxy_log)}", file=sys.stderr)
                status = 1
                break
            if (code := model.poll()) is not None:
                print(f"refusal-guard up: {model.died_message(code)}", file=sys.stderr)
                status = 1
                break
    except LocalModelError as exc:
        print(f"refusal-guard up: {exc}", file=sys.stderr)
        status = 1
    finally:
        if stop.event.is_set():
            print("Stopping the proxy and the model server ...", flush=True)
        if proxy is not None:
            stop_process(proxy, grace=settings.shutdown_grace + 5)
        model.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if status == 0:
        print("Stopped.", flush=True)
    return status


def main(argv: list[str] | None = None) -> int:
    """``python -m guard.ops.up ...``: the same as ``refusal-guard up ...``."""
    parser = argparse.ArgumentParser(prog="refusal-guard")
    add_up_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["up", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
