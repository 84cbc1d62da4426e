"""The machine a benchmark ran on, and how busy it was with other work while it ran."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
from dataclasses import dataclass


def describe() -> dict:
    """CPU model, cores, memory, library versions, date."""
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, val = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Hypervisor vendor"):
                info[key.strip()] = val.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            info["cuda"] = torch.version.cuda
            info["gpu_memory_gib"] = round(
                torch.cuda.get_device_properties(0).total_memory / 2**30, 1
            )
    except ImportError:
        pass
    for mod in ("transformers", "onnxruntime", "grpc", "bitsandbytes", "peft"):
        with contextlib.suppress(ImportError, AttributeError):
            info[mod] = __import__(mod).__version__
    return info


def _cpu_totals() -> tuple[float, float]:
    with open("/proc/stat") as f:
        vals = [float(v) for v in f.readline().split()[1:]]
    idle = vals[3] + vals[4]
    return sum(vals), idle


@dataclass
class LoadWindow:
    """CPU use of the whole machine over a window, and of our own processes."""

    seconds: float
    busy_cores: float
    """Cores busy on average (all processes)."""
    ours_cores: float
    """Cores used by the benchmark's own processes (server, load generator, in-process model)."""
    loadavg_1m: float
    """The 1-minute load average at the end."""

    @property
    def others_cores(self) -> float:
        """Cores taken by other work on the machine (the noise)."""
        return max(0.0, self.busy_cores - self.ours_cores)

    def summary(self) -> dict:
        return {
            "busy_cores": round(self.busy_cores, 2),
            "ours_cores": round(self.ours_cores, 2),
            "others_cores": round(self.others_cores, 2),
            "loadavg_1m": round(self.loadavg_1m, 2),
        }


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads)."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


class LoadMeter:
    """Start, then stop: machine-wide busy cores and our processes' share in between."""

    def __init__(self, pids: list[int]) -> None:
        import psutil

        self._procs = [psutil.Process(p) for p in pids]
        self._t0 = time.monotonic()
        self._tot0, self._idle0 = _cpu_totals()
        self._ours0 = self._ours()

    def _ours(self) -> float:
        total = 0.0
        for p in self._procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except Exception:  # noqa: BLE001 - a process that ended counts as nothing more
                pass
        return total

    def stop(self) -> LoadWindow:
        seconds = time.monotonic() - self._t0
        tot, idle = _cpu_totals()
        ticks = tot - self._tot0
        ncpu = os.cpu_count() or 1
        busy = (ticks - (idle - self._idle0)) / ticks * ncpu if ticks else 0.0
        ours = (self._ours() - self._ours0) / seconds if seconds else 0.0
        return LoadWindow(seconds, busy, ours, os.getloadavg()[0])


# Dense bf16 tensor-core peaks (no sparsity), from NVIDIA's data sheets: H100 SXM and H200 989.4
# TFLOP/s (https://www.nvidia.com/en-us/data-center/h100/, /h200/), H100 PCIe/NVL 756 and 835,
# A100 312 (https://www.nvidia.com/en-us/data-center/a100/).
BF16_PEAK_TFLOPS = {
    "H200": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "A100": 312.0,
}


def bf16_peak_flops(gpu_name: str) -> float | None:
    """The card's dense bf16 peak in FLOP/s, or None for a card not in the table."""
    for key, tflops in BF16_PEAK_TFLOPS.items():  # most specific names first
        if key in gpu_name:
            return tflops * 1e12
    return None


def mfu(parameters: int, tokens_per_s: float, gpu_name: str) -> float | None:
    """Model FLOPs utilisation of a forward-only workload: 2 x parameters x tokens/s over the
    card's bf16 peak (the 2N FLOPs per token of Kaplan et al. 2020, "Scaling Laws for Neural
    Language Models", section 2.1, https://arxiv.org/abs/2001.08361; attention's share is
    left out, so this slightly understates the work at long lengths)."""
    peak = bf16_peak_flops(gpu_name)
    return None if peak is None else 2.0 * parameters * tokens_per_s / peak
