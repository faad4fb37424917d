"""The machine a benchmark ran on, stated in its JSON (docs/design.md, Benchmarks): one function
and one set of keys for every benchmark script (bench_ops, bench_train, bench_data).

Library versions are read from the installed distributions' metadata, so nothing here imports
Ray or pyarrow (the operator benchmark runs on a bare torch + numba machine).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

import torch

__all__ = ["MACHINE_KEYS", "machine_info"]

MACHINE_KEYS = (
    "platform",
    "python",
    "cpu_model",
    "cpu_cores",
    "memory_gb",
    "torch",
    "torch_threads",
    "numpy",
    "numba",
    "numba_threads",
    "pyarrow",
    "ray",
    "device",
    "device_name",
    "cuda",
    "gpu",
)


def _memory_gb() -> float | None:
    try:  # not every OS has these
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _cpu_model() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Platform, CPU model (/proc/cpuinfo), cores, library versions, thread counts and the
    device measured: a dict with exactly the keys of ``MACHINE_KEYS``.

    device_name is the GPU's name on CUDA, the CPU model otherwise; gpu is the name of CUDA
    device 0 when CUDA is available (None otherwise) whatever device was measured; cuda is
    torch's CUDA version on a CUDA device (None otherwise); a library that is not installed
    has version None.
    """
    dev = torch.device(device)
    cpu = _cpu_model()
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "memory_gb": _memory_gb(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": _version("numpy"),
        "numba": _version("numba"),
        "numba_threads": None,
        "pyarrow": _version("pyarrow"),
        "ray": _version("ray"),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu,
        "cuda": torch.version.cuda if dev.type == "cuda" else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if info["numba"] is not None:
        import numba

        info["numba_threads"] = numba.get_num_threads()
    return info
