"""Every command line the deploy files run that reaches a project CLI or torchrun."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from . import COMPOSE_FILE, REPO
from .dockerfile import (
    dockerfiles,
    healthcheck_argv,
    parse_dockerfile,
    stage_entrypoint_cmd,
    stage_files,
)
from .resources import (
    compose_service_argv,
    compose_service_files,
    container_files,
    containers,
    load_compose,
    pod_spec,
    workloads,
)

PROGRAMS = {"reward-server": "reward-server", "policy-trainer": "policy-trainer"}
"""Console scripts of the project, by the name a command line reaches them with."""
MODULES = {"reward_server.cli": "reward-server", "policy_trainer.cli": "policy-trainer"}
"""``python -m`` modules of the project's CLIs."""
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}


@dataclass
class Invocation:
    """One run of a project CLI (or torchrun) found in a deploy file."""

    program: str
    """``reward-server``, ``policy-trainer`` or ``torchrun``."""
    args: list[str]
    """The arguments after the program (and after ``python -m module``)."""
    where: str
    """File and context, for messages."""
    files: dict[str, str] = field(default_factory=dict)
    """Files of the repository the command can see, by container path (baked into the image,
    bind-mounted, or from a ConfigMap/Secret defined here): path -> content."""

    def option(self, flag: str) -> str | None:
        """The value of the last ``flag VALUE`` / ``flag=VALUE`` in the arguments, if any."""
        value = None
        for i, token in enumerate(self.args):
            if token == flag and i + 1 < len(self.args):
                value = self.args[i + 1]
            elif token.startswith(flag + "="):
                value = token.split("=", 1)[1]
        return value

    @property
    def subcommand(self) -> str | None:
        """The first argument when it is not an option."""
        return self.args[0] if self.args and not self.args[0].startswith("-") else None


def _shell_split(script: str) -> list[str]:
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    return list(lexer)


def find_invocations(argv: list[str], where: str, files: dict[str, str]) -> list[Invocation]:
    """Every project CLI or torchrun invocation in an argv (``sh -c`` scripts are split)."""
    if not argv:
        return []
    if Path(argv[0]).name in ("sh", "bash") and "-c" in argv[1:]:
        script_at = argv.index("-c") + 1
        return (
            find_invocations(_shell_split(argv[script_at]), where, files)
            if script_at < len(argv)
            else []
        )
    segments: list[list[str]] = [[]]
    for token in argv:
        if token in SHELL_OPERATORS:
            segments.append([])
        else:
            segments[-1].append(token)
    found: list[Invocation] = []
    for seg in segments:
        while seg and (seg[0] == "exec" or re.fullmatch(r"[A-Za-z_]\w*=.*", seg[0])):
            seg = seg[1:]
        if not seg:
            continue
        prog = Path(seg[0]).name
        if prog in PROGRAMS:
            found.append(Invocation(PROGRAMS[prog], seg[1:], where, files))
        elif re.fullmatch(r"python(3(\.\d+)?)?", prog) and seg[1:2] == ["-m"] and len(seg) > 2:
            if seg[2] in MODULES:
                found.append(Invocation(MODULES[seg[2]], seg[3:], where, files))
        elif prog == "torchrun":
            found.append(Invocation("torchrun", seg[1:], where, files))
    return found


def dockerfile_invocations() -> list[Invocation]:
    """Invocations in each Dockerfile stage's ENTRYPOINT+CMD and HEALTHCHECK."""
    found: list[Invocation] = []
    for path in dockerfiles():
        stages = parse_dockerfile(path)
        for stage in stages:
            if not (stage.last("ENTRYPOINT") or stage.last("CMD") or stage.last("HEALTHCHECK")):
                continue
            where = f"{path.relative_to(REPO)} stage {stage.name}"
            files = stage_files(stages, stage)
            entrypoint, cmd = stage_entrypoint_cmd(stages, stage)
            found += find_invocations(entrypoint + cmd, where + " ENTRYPOINT+CMD", files)
            health = stage.last("HEALTHCHECK")
            argv = healthcheck_argv(health) if health else None
            if argv:
                found += find_invocations(argv, where + " HEALTHCHECK", files)
    return found


def compose_invocations() -> list[Invocation]:
    """Invocations in each compose service's command and healthcheck."""
    found: list[Invocation] = []
    rel = COMPOSE_FILE.relative_to(REPO)
    for name, svc in load_compose()["services"].items():
        files = compose_service_files(name)
        found += find_invocations(compose_service_argv(name), f"{rel} service {name}", files)
        test = (svc.get("healthcheck") or {}).get("test")
        where = f"{rel} service {name} healthcheck"
        if isinstance(test, list) and test and test[0] == "CMD":
            found += find_invocations(test[1:], where, files)
        elif isinstance(test, list) and test and test[0] == "CMD-SHELL":
            found += find_invocations(["sh", "-c", test[1]], where, files)
        elif isinstance(test, str):
            found += find_invocations(["sh", "-c", test], where, files)
    return found


def k8s_invocations() -> list[Invocation]:
    """Invocations in container commands, probes and lifecycle hooks of every workload."""
    found: list[Invocation] = []
    for where, doc in workloads():
        spec = pod_spec(doc) or {}
        for c in containers(spec):
            ctx = f"{where} {doc['kind']}/{doc['metadata']['name']} container {c['name']}"
            files = container_files(spec, c)
            argv = list(c.get("command", [])) + list(c.get("args", []))
            found += find_invocations(argv, ctx, files)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                cmd = ((c.get(probe) or {}).get("exec") or {}).get("command")
                if cmd:
                    found += find_invocations(cmd, f"{ctx} {probe}", files)
            for hook in ("postStart", "preStop"):
                handler = ((c.get("lifecycle") or {}).get(hook) or {}).get("exec") or {}
                if handler.get("command"):
                    found += find_invocations(handler["command"], f"{ctx} {hook}", files)
    return found


def all_invocations() -> list[Invocation]:
    """Every CLI invocation in the Dockerfiles, the compose file and the Kubernetes manifests."""
    return dockerfile_invocations() + compose_invocations() + k8s_invocations()
