"""Kubernetes manifests and the compose file: schema validation (offline) and consistency.

Nothing here reaches a cluster or a container engine: kubernetes-validate bundles the Kubernetes
OpenAPI schemas and check-jsonschema bundles the compose-spec schema, so the validation runs
offline. The rest checks the manifests against each other (names, ports, grace periods, GPUs).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import deploy_checks

REPO = Path(__file__).resolve().parents[2]


_checks = deploy_checks


res = _checks("resources")
inv_mod = _checks("invocations")

# The oldest Kubernetes minor the manifests promise to work on, and the newest bundled schema.
OLDEST_K8S = "1.29.0"


def _all_resources() -> list[tuple[str, dict[str, Any]]]:
    """Plain manifests plus every overlay's rendered output (patched Deployments included)."""
    docs = [(str(p.relative_to(REPO)), d) for p, d in res.manifests()]
    for directory in res.overlay_dirs():
        rel = str(directory.relative_to(REPO))
        docs += [(f"{rel} (rendered)", d) for d in res.render_kustomization(directory)]
    return docs


def _doc(kind: str, name: str) -> dict[str, Any]:
    doc = res.find_resource(kind, name)
    assert doc is not None, f"no {kind}/{name} under deploy/k8s"
    return doc


def _server_invocation(where_part: str) -> Any:
    found = [
        i
        for i in inv_mod.all_invocations()
        if i.program == "reward-server" and i.subcommand == "serve" and where_part in i.where
    ]
    assert found, f"no `reward-server serve` in {where_part}"
    return found[0]


def _server_setting(invocation: Any, key: str) -> Any:
    """A server setting as the process sees it: the flag, else the --config file's key."""
    flag = invocation.option("--" + key.replace("_", "-"))
    if flag is not None:
        return flag
    config_path = invocation.option("--config")
    assert config_path in invocation.files, f"{invocation.where}: {config_path} is not provided"
    return yaml.safe_load(invocation.files[config_path]).get(key)


# ---- schema validation -------------------------------------------------------------------------


@pytest.mark.parametrize("version", [OLDEST_K8S, "latest"])
def test_every_manifest_validates_against_the_kubernetes_schema(version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev extra)")
    from kubernetes_validate import utils

    version = utils.latest_version() if version == "latest" else version
    resources = _all_resources()
    assert len(resources) >= 15
    failures = []
    for where, doc in resources:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            failures.append(f"{where} {doc['kind']}/{doc['metadata']['name']}: {e}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    "breakage",
    ["unknown field", "wrong type", "missing required field"],
)
def test_the_validator_rejects_a_broken_deployment(breakage: str) -> None:
    """The schemas are really applied (strict, offline): each breakage must be caught."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev extra)")
    doc = copy.deepcopy(_doc("Deployment", "reward-server"))
    container = doc["spec"]["template"]["spec"]["containers"][0]
    if breakage == "unknown field":
        container["readinesProbe"] = container.pop("readinessProbe")
    elif breakage == "wrong type":
        container["ports"][0]["containerPort"] = "fifty thousand"
    else:
        del container["name"]
    kv.validate(_doc("Deployment", "reward-server"), OLDEST_K8S, strict=True)
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, OLDEST_K8S, strict=True)


def _compose_validator() -> Any:
    pytest.importorskip("check_jsonschema", reason="check-jsonschema (dev extra)")
    from importlib.resources import files

    import jsonschema

    vendor = files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((vendor / "compose-spec.json").read_text())
    return jsonschema.validators.validator_for(schema)(schema)


def test_compose_file_validates_against_the_compose_spec() -> None:
    validator = _compose_validator()
    compose = res.load_compose()
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)
    broken = copy.deepcopy(compose)
    broken["services"]["reward-server"]["stop_grace_periods"] = "45s"  # a typo
    assert list(validator.iter_errors(broken))


# ---- kustomize layout and references -----------------------------------------------------------


def test_kustomizations_list_every_manifest_but_the_secret_examples() -> None:
    for directory in res.kustomization_dirs():
        kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
        listed = set(kust.get("resources", []))
        for entry in listed:
            assert (directory / entry).exists(), f"{directory}: {entry} does not exist"
        files = {p.name for p in directory.glob("*.yaml") if p.name != "kustomization.yaml"}
        examples = {f for f in files if f.endswith(".example.yaml")}
        assert files - examples <= listed, f"{directory}: not listed: {files - examples - listed}"
        assert not examples & listed, f"{directory}: secret examples must not be applied"
    overlays = res.overlay_dirs()
    namespaces = {
        yaml.safe_load((d / "kustomization.yaml").read_text()).get("namespace")
        for d in res.kustomization_dirs()
        if d not in overlays
    }
    assert namespaces == {_doc("Namespace", "rlhf")["metadata"]["name"]}


def _references(spec: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """(kind, name, key) of every ConfigMap/Secret/PVC/ServiceAccount a pod spec uses."""
    refs: list[tuple[str, str, str | None]] = []
    for v in spec.get("volumes", []):
        if "configMap" in v:
            refs.append(("ConfigMap", v["configMap"]["name"], None))
        if "secret" in v:
            refs.append(("Secret", v["secret"]["secretName"], None))
        if "persistentVolumeClaim" in v:
            refs.append(("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"], None))
    if "serviceAccountName" in spec:
        refs.append(("ServiceAccount", spec["serviceAccountName"], None))
    for c in res.containers(spec):
        for env in c.get("env", []):
            source = env.get("valueFrom", {})
            for kind, field in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                if field in source:
                    refs.append((kind, source[field]["name"], source[field]["key"]))
    return refs


def test_every_referenced_object_is_defined() -> None:
    for where, doc in res.workloads():
        for kind, name, key in _references(res.pod_spec(doc)):
            target = res.find_resource(kind, name)
            assert target is not None, f"{where}: {kind}/{name} is not defined under deploy/k8s"
            if key is not None:
                keys = set(target.get("data", {})) | set(target.get("stringData", {}))
                assert key in keys, f"{where}: {kind}/{name} has no key {key!r}"


def _pod_labels(kind: str, name: str) -> dict[str, str]:
    return _doc(kind, name)["spec"]["template"]["metadata"]["labels"]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_services_pdb_and_hpa_target_the_server_pods() -> None:
    server = _doc("Deployment", "reward-server")
    labels = _pod_labels("Deployment", "reward-server")
    assert _selects(server["spec"]["selector"]["matchLabels"], labels)
    ports = {
        p["name"]: p["containerPort"]
        for p in server["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    for name in ("reward-server", "reward-server-headless"):
        svc = _doc("Service", name)
        assert _selects(svc["spec"]["selector"], labels)
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service/{name}: no container port {port}"
    headless = _doc("Service", "reward-server-headless")["spec"]
    assert headless["clusterIP"] == "None"
    assert not headless.get("publishNotReadyAddresses", False), "DNS must list ready pods only"
    assert _selects(
        _doc("PodDisruptionBudget", "reward-server")["spec"]["selector"]["matchLabels"], labels
    )
    hpa = _doc("HorizontalPodAutoscaler", "reward-server")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "reward-server",
    }
    assert "replicas" not in server["spec"], "the HPA owns the replica count"
    assert hpa["minReplicas"] >= 2, "the PDB's maxUnavailable 1 needs two pods to keep one"
    pods_metrics = [m["pods"]["metric"]["name"] for m in hpa["metrics"] if m["type"] == "Pods"]
    assert pods_metrics == ["reward_server_queue_depth"]


# ---- server: probes, ports, drain --------------------------------------------------------------


def test_native_grpc_probes_use_the_servers_port() -> None:
    deployment = _doc("Deployment", "reward-server")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    serve = _server_invocation("deploy/k8s/server/deployment.yaml")
    port = int(_server_setting(serve, "port"))
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["grpc"] == port
    assert int(_server_setting(serve, "metrics_port")) == int(
        deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]
    )
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port, probe
    # The kubelet calls the health service without a token.
    assert str(_server_setting(serve, "open_health")).lower() == "true"
    assert _server_setting(serve, "host") == "0.0.0.0"


def test_tls_overlays_probe_over_tls_with_exec() -> None:
    tls = [d for d in res.overlay_dirs() if "tls" in d.name]
    assert len(tls) == 2
    for directory in tls:
        docs = res.render_kustomization(directory)
        deployment = next(d for d in docs if d["kind"] == "Deployment")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert "--tls-cert" in container["args"], directory
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = container[probe]["exec"]["command"]
            assert command[:2] == ["reward-server", "health"] and "--tls-ca" in command
            assert "grpc" not in container[probe], "kubelet gRPC probes cannot speak TLS"
            if "--tls-client-ca" in container["args"]:
                assert "--tls-cert" in command and "--tls-key" in command, (directory, probe)


def _prestop_sleep(container: dict[str, Any]) -> float:
    pre = (container.get("lifecycle") or {}).get("preStop") or {}
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    command = (pre.get("exec") or {}).get("command") or []
    match = re.search(r"\bsleep\s+(\d+(?:\.\d+)?)", " ".join(command))
    return float(match.group(1)) if match else 0.0


def test_termination_grace_period_covers_prestop_and_drain() -> None:
    checked = 0
    for where, doc in res.workloads():
        spec = res.pod_spec(doc)
        for container in res.containers(spec):
            argv = list(container.get("command", [])) + list(container.get("args", []))
            for serve in inv_mod.find_invocations(
                argv, where, res.container_files(spec, container)
            ):
                if serve.subcommand != "serve":
                    continue
                grace = _server_setting(serve, "grace_seconds")
                assert grace is not None, f"{where}: set grace_seconds explicitly"
                budget = float(grace) + _prestop_sleep(container)
                period = spec.get("terminationGracePeriodSeconds", 30)
                assert period > budget, (
                    f"{where}: terminationGracePeriodSeconds {period} <= {budget}"
                )
                checked += 1
    assert checked >= 3  # the base Deployment and the tls and mtls renderings


def test_compose_stop_grace_period_covers_the_drain() -> None:
    serve = _server_invocation("compose.yaml service reward-server")
    service = res.load_compose()["services"]["reward-server"]
    grace = float(_server_setting(serve, "grace_seconds"))
    assert res.parse_duration(service["stop_grace_period"]) > grace


# ---- GPUs and torchrun -------------------------------------------------------------------------


def _gpus(container: dict[str, Any]) -> int:
    resources = container.get("resources", {})
    limit = int(resources.get("limits", {}).get("nvidia.com/gpu", 0))
    request = resources.get("requests", {}).get("nvidia.com/gpu")
    assert request is None or int(request) == limit, "extended resources: requests == limits"
    return limit


def test_server_and_trainer_request_gpus() -> None:
    for kind, name in (("Deployment", "reward-server"), ("Job", "policy-trainer")):
        spec = _doc(kind, name)["spec"]["template"]["spec"]
        assert _gpus(spec["containers"][0]) >= 1, f"{kind}/{name}"
        assert spec["containers"][0]["resources"]["requests"]["cpu"]
        assert spec["containers"][0]["resources"]["requests"]["memory"]


def test_trainer_job_shape_matches_torchrun() -> None:
    job = _doc("Job", "policy-trainer")
    spec = job["spec"]["template"]["spec"]
    container = spec["containers"][0]
    [torchrun] = inv_mod.find_invocations(container["command"] + container["args"], "job", {})
    assert torchrun.program == "torchrun"
    nodes = int(torchrun.option("--nnodes"))
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nodes
    assert int(torchrun.option("--nproc-per-node")) == _gpus(container)
    # Node 0 hosts the rendezvous; its stable DNS name comes from the subdomain Service.
    assert torchrun.option("--master-addr") == f"{job['metadata']['name']}-0.{spec['subdomain']}"
    rendezvous = _doc("Service", spec["subdomain"])["spec"]
    assert rendezvous["clusterIP"] == "None"
    assert int(torchrun.option("--master-port")) in [p["port"] for p in rendezvous["ports"]]
    assert _selects(rendezvous["selector"], job["spec"]["template"]["metadata"]["labels"])
    assert torchrun.args[torchrun.args.index("-m") + 1] == "policy_trainer.cli"


def test_trainer_balances_over_the_headless_service() -> None:
    namespace = yaml.safe_load((REPO / "deploy/k8s/trainer/kustomization.yaml").read_text())[
        "namespace"
    ]
    port = _doc("Service", "reward-server-headless")["spec"]["ports"][0]["port"]
    expected = f"dns:///reward-server-headless.{namespace}.svc.cluster.local:{port}"
    launches = [i for i in inv_mod.k8s_invocations() if i.program == "torchrun"]
    assert launches
    for torchrun in launches:  # --server belongs to the launched `policy_trainer.cli ppo`
        assert torchrun.option("--server") == expected, torchrun.where


def test_reload_overlay_mounts_the_admin_token_and_the_config_as_a_directory() -> None:
    """SIGHUP re-reads the config only if the kubelet updates the file: a ConfigMap mounted with
    subPath never changes in a running pod; the admin token comes from its own Secret."""
    directory = next(d for d in res.overlay_dirs() if d.name == "reload")
    docs = res.render_kustomization(directory)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    container = spec["containers"][0]
    argv = container["args"]
    config, admin_file = (argv[argv.index(flag) + 1] for flag in ("--config", "--admin-token-file"))
    config_mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert "subPath" not in config_mount
    files = res.container_files(spec, container)
    assert config in files and "reward_models" in files[config]
    admin = next(v for v in spec["volumes"] if v["name"] == "admin")["secret"]["secretName"]
    assert admin != "reward-server-tokens"
    # the example Secret defines the file the flag names (the real one is created by hand)
    assert admin_file in files
