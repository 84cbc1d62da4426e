# The README's commands. Every target creates or reuses .venv and installs what it needs.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Everything (server, trainer, ONNX Runtime) for CPU by default; `make install EXTRA=gpu` on a CUDA
# machine (never both: onnxruntime and onnxruntime-gpu overwrite each other's files). The client
# alone needs no extra: `pip install .` (see pyproject.toml).
EXTRA ?= cpu
TORCH_VERSION := 2.13.0
PROTO_SRC := proto/rlhf/v1/reward_service.proto
GEN_DIR := reward_server/api/rlhf/v1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-all lint format proto proto-check demo demo-overoptimization bench clean

$(BIN)/python:
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) (set PY=python3.x)"; exit 1; }
	$(PY) -m venv $(VENV)

# torch first (pinned, so no other build is resolved), then the project.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRA),dev]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Everything, the slow tests included (GPU tests still skip without a GPU).
test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# protoc maps the virtual path reward_server/api/ onto proto/, so the generated _grpc.py imports
# `reward_server.api.rlhf.v1.reward_service_pb2`: a real package, no sys.path hacks.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Ireward_server/api=proto \
		--python_out=. --pyi_out=. --grpc_python_out=. \
		reward_server/api/rlhf/v1/reward_service.proto

proto-check: $(STAMP)
	@tmp=$$(mktemp -d) && \
	$(BIN)/python -m grpc_tools.protoc -Ireward_server/api=proto \
		--python_out=$$tmp --pyi_out=$$tmp --grpc_python_out=$$tmp \
		reward_server/api/rlhf/v1/reward_service.proto && \
	for f in reward_service_pb2.py reward_service_pb2.pyi reward_service_pb2_grpc.py; do \
		diff -u $(GEN_DIR)/$$f $$tmp/$(GEN_DIR)/$$f || { echo "stale generated code: run 'make proto'"; rm -rf $$tmp; exit 1; }; \
	done; rm -rf $$tmp; echo "generated code is up to date"

demo: $(STAMP)
	$(BIN)/python -m policy_trainer.demo

demo-overoptimization: $(STAMP)
	$(BIN)/python -m policy_trainer.demo --overoptimization

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
