"""Benchmarks of the reward service: load generator, in-process limit, naive baseline, curves.

Run ``python -m bench --help``; every figure in docs/BENCHMARKS.md names the command that made it.
"""

import os

# The same OpenMP wait policy the server sets (reward_server/engine/calibration.py), before torch loads, so
# the in-process limit is measured under the same threading as the server.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
