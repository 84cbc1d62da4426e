"""Static checks of the deploy files: Dockerfiles, the compose file, the Kubernetes manifests.

Nothing here needs a container engine or a cluster. The files are parsed, every command line they
run is extracted with the config files it can see (baked into the image or mounted), and the
tests in tests/unit/test_deploy_*.py check each flag against the real CLIs' argparse parsers
(through their ``--help``), each config against the real config loaders, and the manifests
against each other (ports, grace periods, names).
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The repository root."""
DEPLOY = REPO / "deploy"
DOCKER_DIR = DEPLOY / "docker"
COMPOSE_FILE = DEPLOY / "compose" / "compose.yaml"
K8S_DIR = DEPLOY / "k8s"
