"""The compose file and the Kubernetes manifests: loading, overlay rendering, mounted files."""

from __future__ import annotations

import base64
import copy
import re
from pathlib import Path
from typing import Any

import yaml

from . import COMPOSE_FILE, K8S_DIR
from .dockerfile import parse_dockerfile, stage_files, target_stage


def load_yaml_docs(path: Path) -> list[Any]:
    """Every non-empty document of a YAML file."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def parse_duration(value: str | int | float) -> float:
    """A compose duration (``45s``, ``1m30s``, ``500ms``) in seconds."""
    if isinstance(value, int | float):
        return float(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"not a duration: {value!r}")
    return sum(float(n) * units[u] for n, u in parts)


# ---- compose -------------------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    """The compose file as a mapping."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose_images() -> dict[str, tuple[Path, str | None]]:
    """Image name -> (Dockerfile, target) for every compose service that builds one."""
    images: dict[str, tuple[Path, str | None]] = {}
    for svc in load_compose()["services"].values():
        build = svc.get("build")
        if isinstance(build, dict) and "image" in svc:
            context = (COMPOSE_FILE.parent / build.get("context", ".")).resolve()
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            images[svc["image"]] = (dockerfile, build.get("target"))
    return images


def compose_argv(value: Any) -> list[str]:
    """A compose command/entrypoint (list, or a string split like a shell would)."""
    import shlex

    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value or []]


def compose_service_argv(name: str) -> list[str]:
    """What a compose service runs: its entrypoint and command over the image's defaults."""
    from .dockerfile import stage_entrypoint_cmd

    svc = load_compose()["services"][name]
    if "entrypoint" in svc:  # an entrypoint override also clears the image's CMD
        return compose_argv(svc["entrypoint"]) + compose_argv(svc.get("command"))
    dockerfile, target = compose_images()[svc["image"]]
    stages = parse_dockerfile(dockerfile)
    entrypoint, cmd = stage_entrypoint_cmd(stages, target_stage(stages, target))
    if "command" in svc:
        cmd = compose_argv(svc["command"])
    return entrypoint + cmd


def compose_service_files(name: str) -> dict[str, str]:
    """Files a compose service's container sees: baked into its image, then bind-mounted."""
    svc = load_compose()["services"][name]
    files: dict[str, str] = {}
    image = compose_images().get(svc.get("image", ""))
    if image is not None:
        stages = parse_dockerfile(image[0])
        files.update(stage_files(stages, target_stage(stages, image[1])))
    for vol in svc.get("volumes", []):
        if isinstance(vol, dict):
            source, target = vol.get("source", ""), vol.get("target", "")
        else:
            source, target = (vol.split(":") + [""])[:2]
        path = COMPOSE_FILE.parent / source
        if source.startswith((".", "/")) and path.is_file():
            files[target] = path.read_text()
    return files


# ---- Kubernetes --------------------------------------------------------------------------------


def kustomization_dirs() -> list[Path]:
    """Every directory under deploy/k8s with a kustomization.yaml."""
    return sorted(p.parent for p in K8S_DIR.rglob("kustomization.yaml"))


def manifest_files() -> list[Path]:
    """Every Kubernetes resource file (kustomization.yaml files excluded)."""
    return sorted(p for p in K8S_DIR.rglob("*.yaml") if p.name != "kustomization.yaml")


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    """Every resource under deploy/k8s, with its file."""
    return [(p, doc) for p in manifest_files() for doc in load_yaml_docs(p)]


def find_resource(kind: str, name: str) -> dict[str, Any] | None:
    """The resource of this kind and name under deploy/k8s, if one is defined."""
    for _, doc in manifests():
        if doc.get("kind") == kind and doc["metadata"]["name"] == name:
            return doc
    return None


def apply_json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """Apply RFC 6902 ``add``/``replace``/``remove`` operations (what the overlays use)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last, kind = parts[-1], op["op"]
        if kind not in ("add", "replace", "remove"):
            raise ValueError(f"unsupported op {kind}")
        if isinstance(parent, list):
            if kind == "add":
                parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(op["value"]))
            elif kind == "replace":
                parent[int(last)] = copy.deepcopy(op["value"])
            else:
                del parent[int(last)]
        else:
            if kind != "add" and last not in parent:
                raise KeyError(f"{kind} of a missing member {op['path']}")
            if kind == "remove":
                del parent[last]
            else:
                parent[last] = copy.deepcopy(op["value"])
    return doc


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    """The resources a kustomization yields: its resources with its inline JSON 6902 patches.

    Supports what this project's kustomizations use (``resources`` files and directories,
    ``patches`` with a kind/name target); namespaces, labels and images are not applied.
    """
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for res in kust.get("resources", []):
        path = (directory / res).resolve()
        docs.extend(render_kustomization(path) if path.is_dir() else load_yaml_docs(path))
    for patch in kust.get("patches", []):
        target, ops = patch["target"], yaml.safe_load(patch["patch"])
        hits = [
            i
            for i, d in enumerate(docs)
            if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]
        ]
        if len(hits) != 1:
            raise ValueError(f"{directory}: patch target {target} matched {len(hits)} resources")
        docs[hits[0]] = apply_json_patch(docs[hits[0]], ops)
    return docs


def overlay_dirs() -> list[Path]:
    """Kustomizations that patch others (their rendering differs from the plain files)."""
    return [
        d
        for d in kustomization_dirs()
        if yaml.safe_load((d / "kustomization.yaml").read_text()).get("patches")
    ]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The pod spec of a workload resource (Deployment, Job, ...), else None."""
    if doc.get("kind") == "Pod":
        return doc["spec"]
    if doc.get("kind") == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    template = doc.get("spec", {}).get("template") if isinstance(doc.get("spec"), dict) else None
    return template.get("spec") if isinstance(template, dict) else None


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Init and regular containers of a pod spec."""
    return list(spec.get("initContainers", [])) + list(spec.get("containers", []))


def workloads() -> list[tuple[str, dict[str, Any]]]:
    """Every workload: from the plain manifests, and from each overlay's rendering."""
    out = [(str(p.relative_to(K8S_DIR.parents[1])), d) for p, d in manifests() if pod_spec(d)]
    for directory in overlay_dirs():
        rel = directory.relative_to(K8S_DIR.parents[1])
        out += [(f"{rel} (rendered)", d) for d in render_kustomization(directory) if pod_spec(d)]
    return out


def _volume_data(volume: dict[str, Any]) -> dict[str, str] | None:
    """Key -> content of a ConfigMap or Secret volume whose resource is defined here."""
    if "configMap" in volume:
        doc = find_resource("ConfigMap", volume["configMap"]["name"])
        return dict(doc.get("data", {})) if doc else None
    if "secret" in volume:
        doc = find_resource("Secret", volume["secret"]["secretName"])
        if doc is None:
            return None
        data = {k: base64.b64decode(v).decode() for k, v in doc.get("data", {}).items()}
        data.update(doc.get("stringData", {}))
        return data
    return None


def container_files(spec: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """Files a container sees from ConfigMap and Secret volumes: path -> content."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    files: dict[str, str] = {}
    for mount in container.get("volumeMounts", []):
        data = _volume_data(volumes.get(mount["name"], {}))
        if data is None:
            continue
        items = volumes[mount["name"]].get("configMap") or volumes[mount["name"]].get("secret")
        keys = {i["key"]: i["path"] for i in items.get("items", [])} or {k: k for k in data}
        if "subPath" in mount:
            if mount["subPath"] in keys.values():
                key = next(k for k, p in keys.items() if p == mount["subPath"])
                files[mount["mountPath"]] = data[key]
        else:
            for key, path in keys.items():
                files[f"{mount['mountPath'].rstrip('/')}/{path}"] = data[key]
    return files
