"""Real servers on loopback for tests: uvicorn in a thread, a port finder, and child processes.

Every process a test starts goes through :func:`spawn` (its own process group) and is stopped
with :func:`stop_group` in a ``finally`` (SIGTERM to the whole group, SIGKILL after a grace
period, then SIGKILL to whatever of the group is left), so nothing outlives the test, pass or
fail; workers a child forks (``--workers 2``) are in its group and go with it.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from typing import Callable, TypeVar

import httpx

import uvicorn

from guard.ops.local_model import stop_process


T = TypeVar("T")


def eventually(condition: Callable[[], T], timeout: float = 30.0, what: str = "the condition") -> T:
    """Poll ``condition`` until it returns something truthy and return that; fail after ``timeout`` s.

    For what the guard does after the client has its answer (scoring, the datapoint log's flush):
    a fixed sleep is a guess about the machine's speed, this waits for the event itself.
    """
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout} s")
        time.sleep(0.05)
    return value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """Serve an ASGI app with uvicorn on a free loopback port until ``stop()``."""

    def __init__(self, app, *, port: int | None = None, **config) -> None:
        self.port = port or free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on", **config)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def spawn(args: list[str], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` in a new session, so :func:`stop_group` reaches everything it starts."""
    return subprocess.Popen(args, start_new_session=True, **kwargs)


def stop_group(proc: subprocess.Popen, grace: float = 20.0) -> int | None:
    """Stop ``proc``'s process group (see ``guard.ops.local_model.stop_process``); safe to call twice."""
    return stop_process(proc, grace)


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Wait until ``url`` answers below 500; fail early if ``proc`` dies."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout} s")
        time.sleep(0.1)
