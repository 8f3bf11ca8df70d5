"""Per-GPU utilisation, memory and power from NVML, read at scrape time.

NVML is optional: without ``nvidia-ml-py``, without a driver, or on a machine with no GPU the sampler
reports no devices and the GPU families are simply absent from ``/metrics``. A device that errors on
one reading is skipped for that scrape rather than failing the whole endpoint.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class GpuSample:
    index: int
    name: str
    utilization: float  # 0..1, share of the last sample period a kernel was running
    memory_used_bytes: int
    memory_total_bytes: int
    power_watts: float | None  # None where the board does not report power


def load_nvml() -> ModuleType | None:
    """The ``pynvml`` module (shipped by nvidia-ml-py), or None when it is not installed."""
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def _visible_indices(count: int) -> list[int]:
    """NVML sees every GPU on the host; report only those this process was given."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None or env.strip() == "":
        return list(range(count)) if env is None else []
    indices = []
    for part in env.split(","):
        part = part.strip()
        if not part.isdigit():  # UUIDs or MIG ids: we cannot map them cheaply, so report all
            return list(range(count))
        if int(part) < count:
            indices.append(int(part))
    return indices


class GpuSampler:
    def __init__(self, nvml: Any | None = None) -> None:
        self._nvml = nvml if nvml is not None else load_nvml()
        self._lock = threading.Lock()
        self._handles: list[tuple[int, Any, str]] | None = None  # None until first use

    def _init(self) -> list[tuple[int, Any, str]]:
        nvml = self._nvml
        if nvml is None:
            return []
        try:
            nvml.nvmlInit()
            count = nvml.nvmlDeviceGetCount()
            handles = []
            for i in _visible_indices(count):
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                name = nvml.nvmlDeviceGetName(handle)
                handles.append((i, handle, name.decode() if isinstance(name, bytes) else str(name)))
            return handles
        except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded on a CPU host
            logger.info("GPU metrics off: NVML unavailable (%s)", exc)
            return []

    @property
    def available(self) -> bool:
        return bool(self._devices())

    def _devices(self) -> list[tuple[int, Any, str]]:
        with self._lock:
            if self._handles is None:
                self._handles = self._init()
            return self._handles

    def sample(self) -> list[GpuSample]:
        nvml = self._nvml
        samples = []
        for index, handle, name in self._devices():
            try:
                util = nvml.nvmlDeviceGetUtilizationRates(handle)
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception as exc:
                logger.debug("NVML read failed for GPU %d: %s", index, exc)
                continue
            try:
                power: float | None = nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0  # mW -> W
            except Exception:
                power = None
            samples.append(GpuSample(index, name, util.gpu / 100.0, int(mem.used), int(mem.total), power))
        return samples
