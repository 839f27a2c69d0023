from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.scripted_upstream import Script, build_upstream
from tests.servers import ServerThread

os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)


@pytest.fixture
def script() -> Script:
    return Script()


@pytest.fixture
def upstream(script: Script) -> Iterator[ServerThread]:
    with ServerThread(build_upstream(script)) as server:
        yield server


@pytest.fixture
def start_proxy(upstream: ServerThread):
    """Start a real proxy (uvicorn on loopback) in front of the scripted upstream."""
    from prometheus_client import CollectorRegistry

    from guard.app import create_app
    from guard.settings import Settings

    servers: list[ServerThread] = []

    def start(**overrides) -> ServerThread:
        values = {"upstream": upstream.url + "/v1", "mode": "off", "datapoints": None, "upstream_check_interval": 0,
                  **overrides}
        server = ServerThread(create_app(Settings(**values), registry=CollectorRegistry())).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
