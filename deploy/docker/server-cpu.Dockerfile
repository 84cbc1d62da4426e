# syntax=docker/dockerfile:1
# Reward server, CPU variant (torch CPU wheels, onnxruntime, bitsandbytes >= 0.50 k-bit on CPU).
# Build from the repository root (the allowlist in server-cpu.Dockerfile.dockerignore applies):
#   docker build -f deploy/docker/server-cpu.Dockerfile -t rlhf/reward-server:cpu .
# Run (mount Hugging Face checkpoints at /models/reward and /models/reference):
#   docker run --rm -p 127.0.0.1:50051:50051 --stop-timeout 45 -v "$PWD/models:/models:ro" \
#     rlhf/reward-server:cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- proto: regenerate the gRPC code from the .proto and refuse a stale committed copy ----------
FROM ${PYTHON_IMAGE} AS proto
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install "grpcio-tools==1.85.1"
WORKDIR /src
COPY proto ./proto
COPY reward_server/api ./reward_server/api
# protoc maps the virtual path reward_server/api/ onto proto/ (as `make proto` does), so the
# generated module imports `reward_server.api.rlhf.v1.reward_service_pb2`.
RUN mkdir -p /gen \
 && python -m grpc_tools.protoc -Ireward_server/api=proto \
      --python_out=/gen --pyi_out=/gen --grpc_python_out=/gen \
      reward_server/api/rlhf/v1/reward_service.proto \
 && diff -r -x __init__.py -x __pycache__ reward_server/api/rlhf/v1 /gen/reward_server/api/rlhf/v1

# ---- build: a virtual environment with torch (CPU) and the project --------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first and pinned, from the CPU wheel index, so no CUDA build is ever resolved.
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
RUN pip install ".[cpu]" && pip check

# ---- runtime: the venv only, as a non-root user ----------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG APP_UID=10001
RUN groupadd --system --gid ${APP_UID} app \
 && useradd --system --uid ${APP_UID} --gid app --create-home --home-dir /home/app \
      --shell /usr/sbin/nologin app \
 && mkdir -p /models /etc/reward-server \
 && chown app:app /models
COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/server.yaml /etc/reward-server/server.yaml
# HF_HUB_OFFLINE: models load from mounted directories; set it to 0 to allow hub ids.
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
# The server drains in-flight work for grace_seconds (30) after SIGTERM: stop it with a longer
# timeout (`docker stop -t 45`, compose `stop_grace_period: 45s`).
STOPSIGNAL SIGTERM
# Calls the standard grpc.health.v1 service; SERVING only once the models are loaded and warm.
HEALTHCHECK --interval=15s --timeout=10s --start-period=180s --retries=3 \
  CMD ["reward-server", "health", "--server", "127.0.0.1:50051", "--timeout", "5"]
ENTRYPOINT ["reward-server"]
CMD ["serve", "--config", "/etc/reward-server/server.yaml"]
