"""`reward_server.client` must import without torch or transformers."""

import subprocess
import sys


def test_client_imports_without_torch():
    code = (
        "import sys, reward_server.client, reward_server.fingerprint; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_split_targets_and_chunks():
    from reward_server.client import chunks, split_targets

    assert split_targets("h1:1,h2:2") == ["h1:1", "h2:2"]
    assert split_targets("dns:///svc.ns:50051") == ["dns:///svc.ns:50051"]
    assert chunks(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert chunks(0, 3) == []
