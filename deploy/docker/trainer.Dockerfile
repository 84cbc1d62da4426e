# syntax=docker/dockerfile:1
# PPO trainer (policy-trainer), two targets:
#   cuda (default): torch's CUDA wheels, for GPUs and torchrun
#     docker build -f deploy/docker/trainer.Dockerfile -t rlhf/policy-trainer:cuda .
#   cpu: torch CPU wheels, for the compose demo and CPU smoke runs
#     docker build -f deploy/docker/trainer.Dockerfile --target cpu -t rlhf/policy-trainer:cpu .
# The trainer talks to the reward server over gRPC; it loads only the policy model itself, so the
# image has the `trainer` extra only (no serving or ONNX packages).
# Runs (metrics.jsonl, checkpoints, plots) go to /runs: mount a volume there.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

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

# ---- build-cpu: venv with torch (CPU wheels) and the project --------------------------------------
FROM ${PYTHON_IMAGE} AS build-cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
ARG TORCH_VERSION=2.13.0
RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY reward_server ./reward_server
COPY policy_trainer ./policy_trainer
COPY --from=proto /gen/reward_server/api/rlhf/v1/ ./reward_server/api/rlhf/v1/
# DL3013: the project itself; its dependencies are pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[trainer]" && pip check

# ---- build-cuda: venv with torch (CUDA wheels) and the project ------------------------------------
FROM ${CUDA_IMAGE} AS build-cuda
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
# DL3013: the project itself; its dependencies are pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[trainer]" && pip check

# ---- cpu: runtime on the slim Python image ---------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
ARG APP_UID=10001
RUN groupadd --system --gid ${APP_UID} app \
 && useradd --system --uid ${APP_UID} --gid app --create-home --home-dir /home/app \
      --shell /usr/sbin/nologin app \
 && mkdir -p /runs /models /etc/policy-trainer \
 && chown app:app /runs /models
COPY --from=build-cpu /opt/venv /opt/venv
# DL3064 is a false positive on TOKENIZERS_PARALLELISM (no secret is set here).
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/tmp/hf \
    TOKENIZERS_PARALLELISM=false
USER ${APP_UID}:${APP_UID}
WORKDIR /runs
ENTRYPOINT ["policy-trainer"]
CMD ["--help"]

# ---- cuda (default target): runtime on the CUDA base image -----------------------------------------
FROM ${CUDA_IMAGE} AS cuda
ARG APP_UID=10001
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid ${APP_UID} app \
 && useradd --system --uid ${APP_UID} --gid app --create-home --home-dir /home/app \
      --shell /usr/sbin/nologin app \
 && mkdir -p /runs /models /etc/policy-trainer \
 && chown app:app /runs /models
COPY --from=build-cuda /opt/venv /opt/venv
# DL3064 is a false positive on TOKENIZERS_PARALLELISM (no secret is set here).
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/tmp/hf \
    TOKENIZERS_PARALLELISM=false
USER ${APP_UID}:${APP_UID}
WORKDIR /runs
# Multi-GPU: override the entrypoint with
#   torchrun --nproc-per-node N -m policy_trainer.cli ppo --config ... --server ...
ENTRYPOINT ["policy-trainer"]
CMD ["--help"]
