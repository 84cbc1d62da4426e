# syntax=docker/dockerfile:1
# Reward server, CUDA variant (torch's CUDA wheels, onnxruntime-gpu, bitsandbytes).
# Build from the repository root (the allowlist in server-cuda.Dockerfile.dockerignore applies):
#   docker build -f deploy/docker/server-cuda.Dockerfile -t rlhf/reward-server:cuda .
# Run on a host with the NVIDIA container toolkit:
#   docker run --rm --gpus all -p 127.0.0.1:50051:50051 --stop-timeout 45 \
#     -v "$PWD/models:/models:ro" rlhf/reward-server:cuda
# torch 2.13.0 from PyPI is built against CUDA 13.0 and brings its own CUDA libraries as wheels;
# the base image supplies the matching driver requirement (host driver >= 580).
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- proto: regenerate the gRPC code from the .proto and refuse a stale committed copy ----------
FROM ${PYTHON_IMAGE} AS proto
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install "grpcio-tools==1.85.1"
WORKDIR /src
COPY proto ./proto
COPY reward_server/api ./reward_server/api
RUN mkdir -p /gen \
 && python -m grpc_tools.protoc -Ireward_server/api=proto \
      --python_out=/gen --pyi_out=/gen --grpc_python_out=/gen \
      reward_server/api/rlhf/v1/reward_service.proto \
 && diff -r -x __init__.py -x __pycache__ reward_server/api/rlhf/v1 /gen/reward_server/api/rlhf/v1

# ---- build: a virtual environment with torch (CUDA) and the project -------------------------------
FROM ${CUDA_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
ARG TORCH_VERSION=2.13.0
RUN pip install "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY reward_server ./reward_server
COPY policy_trainer ./policy_trainer
COPY --from=proto /gen/reward_server/api/rlhf/v1/ ./reward_server/api/rlhf/v1/
# The gpu extra only: onnxruntime and onnxruntime-gpu overwrite each other's files.
# DL3013: the project itself; its dependencies are pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[gpu]" && pip check

# ---- runtime: the CUDA runtime base, the venv, a non-root user -----------------------------------
FROM ${CUDA_IMAGE} AS runtime
ARG APP_UID=10001
ENV DEBIAN_FRONTEND=noninteractive
# The venv's interpreter is a link to /usr/bin/python3, so the same python3 package is installed.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid ${APP_UID} app \
 && useradd --system --uid ${APP_UID} --gid app --create-home --home-dir /home/app \
      --shell /usr/sbin/nologin app \
 && mkdir -p /models /etc/reward-server \
 && chown app:app /models
COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/server.yaml /etc/reward-server/server.yaml
# DL3064 is a false positive on TOKENIZERS_PARALLELISM (no secret is set here).
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/tmp/hf \
    TOKENIZERS_PARALLELISM=false
USER ${APP_UID}:${APP_UID}
WORKDIR /home/app
EXPOSE 50051 9090
# Drain: see server-cpu.Dockerfile (stop timeout must exceed grace_seconds).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=10s --start-period=300s --retries=3 \
  CMD ["reward-server", "health", "--server", "127.0.0.1:50051", "--timeout", "5"]
ENTRYPOINT ["reward-server"]
CMD ["serve", "--config", "/etc/reward-server/server.yaml"]
