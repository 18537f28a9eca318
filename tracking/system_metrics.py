"""Each rank's machine, sampled on a daemon thread: CPU, memory, the output directory's disk and the
network (psutil), this process's own memory, and this rank's GPU when nvidia-ml-py is installed. The
samples go through the tracker's outbox like every other record.

Sampled here rather than through MLflow's monitor classes (mlflow.system_metrics.metrics.*), which
are not public API. The names are those MLflow's system metrics use, so dashboards made for them keep
working: cpu_utilization_percentage, system_memory_usage_megabytes, system_memory_usage_percentage,
disk_usage_percentage, disk_usage_megabytes, disk_available_megabytes, network_receive_megabytes,
network_transmit_megabytes (since sampling started), and per GPU gpu_<i>_utilization_percentage,
gpu_<i>_memory_usage_megabytes, gpu_<i>_memory_usage_percentage, gpu_<i>_power_usage_watts,
gpu_<i>_power_usage_percentage, where i counts the GPUs this rank reports (0: its own). Two of ours:
process_memory_rss_megabytes and, on GPU, torch_cuda_max_allocated_megabytes (the node's totals are
shared by every rank on it)."""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Callable

log = logging.getLogger("ldot.tracking")

Sample = Callable[[], "dict[str, float]"]


class SystemMetrics:
    """Samples every interval_s seconds and emits (metrics, step), step being whole seconds since
    `started_at`; at most one sample per step. MLflow's own SystemMetricsMonitor stops for good at the
    first failed request; here a sampler that fails costs its own metrics only, never training."""

    def __init__(self, emit: Callable[[dict, int], None], started_at: float, interval_s: float,
                 device_index: int | None = None, disk_path: str | os.PathLike = os.sep):
        self.samplers: dict[str, Sample] = {}
        for name, make in (("cpu", _cpu_and_memory), ("disk", lambda: _disk(disk_path)), ("network", _network),
                           ("process", _process), ("gpu", lambda: _gpu(device_index))):
            try:
                sampler = make()
            except Exception as exc:  # psutil or NVML unusable here: go on without these metrics
                log.warning("system metrics: no %s metrics (%s)", name, exc)
                continue
            if sampler is not None:
                self.samplers[name] = sampler
        self.emit, self.started_at, self.interval_s = emit, started_at, interval_s
        self._failed: set[str] = set()
        self._stop = threading.Event()
        self._last_step: int | None = None
        self._thread = threading.Thread(target=self._loop, name="system-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._sample_and_emit()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample_and_emit()

    def sample(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for name, sampler in self.samplers.items():
            try:
                metrics.update(sampler())
            except Exception as exc:  # a sampler must never take training down
                if name not in self._failed:
                    log.warning("system metrics: %s sample failed (%s); reported once", name, exc)
                    self._failed.add(name)
        return metrics

    def _sample_and_emit(self) -> None:
        try:
            step = int(time.time() - self.started_at)
            if step == self._last_step:  # one sample a second at most (stop() right after one)
                return
            metrics = self.sample()
            if metrics:
                self.emit(metrics, step)
                self._last_step = step
        except Exception as exc:  # the emit too: a sampler must never take training down
            log.debug("system metrics sample failed: %s", exc)


def _cpu_and_memory() -> Sample:
    """The node's CPU use since the sample before (the first: since construction) and its memory.

    From psutil.cpu_times() rather than psutil.cpu_percent(), which keeps its last reading per calling
    thread: its first call on the sampling thread would read about 0 whatever the load."""
    import psutil

    def busy_and_total() -> tuple[float, float]:
        t = psutil.cpu_times()
        total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)  # Linux counts guest in user
        return total - t.idle - getattr(t, "iowait", 0.0), total

    last = [busy_and_total()]

    def sample() -> dict[str, float]:
        (busy0, total0), (busy1, total1) = last[0], busy_and_total()
        last[0] = (busy1, total1)
        cpu = 100 * (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
        memory = psutil.virtual_memory()
        return {"cpu_utilization_percentage": round(min(100.0, max(0.0, cpu)), 1),
                "system_memory_usage_megabytes": round(memory.used / 1e6, 1),
                "system_memory_usage_percentage": round(memory.used / memory.total * 100, 1)}

    return sample


def _disk(path: str | os.PathLike) -> Sample:
    """The filesystem holding `path` (the run's output directory: where checkpoints fill a disk)."""
    import psutil

    path = os.fspath(path)

    def sample() -> dict[str, float]:
        usage = psutil.disk_usage(path)
        return {"disk_usage_percentage": round(usage.percent, 1), "disk_usage_megabytes": round(usage.used / 1e6, 1),
                "disk_available_megabytes": round(usage.free / 1e6, 1)}

    return sample


def _network() -> Sample:
    """Bytes received and sent by the node since sampling started (psutil counts since boot)."""
    import psutil

    start = psutil.net_io_counters()

    def sample() -> dict[str, float]:
        now = psutil.net_io_counters()
        return {"network_receive_megabytes": (now.bytes_recv - start.bytes_recv) / 1e6,
                "network_transmit_megabytes": (now.bytes_sent - start.bytes_sent) / 1e6}

    return sample


def _process() -> Sample:
    """This rank's resident memory and, once it uses CUDA, the most memory torch has held."""
    import psutil

    proc = psutil.Process()

    def sample() -> dict[str, float]:
        out = {"process_memory_rss_megabytes": round(proc.memory_info().rss / 1e6, 1)}
        torch = sys.modules.get("torch")  # never imported here: a process without torch goes without
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            out["torch_cuda_max_allocated_megabytes"] = round(torch.cuda.max_memory_allocated() / 1e6, 1)
        return out

    return sample


def _gpu(device_index: int | None) -> Sample | None:
    """NVML's view of this rank's GPU (every GPU of the node when the rank's cannot be told), or None
    without nvidia-ml-py or a GPU."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception as exc:  # pynvml.NVMLError: no driver, no GPU
        log.debug("no GPU metrics: %s", exc)
        return None
    if device_index is not None:
        try:
            # by UUID: CUDA_VISIBLE_DEVICES renumbers torch's devices, not NVML's
            want = _cuda_uuid(device_index)
            mine = [h for h in handles if want in str(pynvml.nvmlDeviceGetUUID(h))]
            if mine:
                handles = mine
        except Exception as exc:
            log.debug("GPU metrics report every GPU of the node: %s", exc)
    if not handles:
        return None

    def read(handle, prefix: str) -> dict[str, float]:
        out: dict[str, float] = {}
        try:
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            out[prefix + "memory_usage_megabytes"] = round(memory.used / 1e6, 1)
            out[prefix + "memory_usage_percentage"] = round(memory.used / memory.total * 100, 1)
        except Exception as exc:  # pynvml.NVMLError_NotSupported and the like: skip what this GPU lacks
            log.debug("GPU memory not read: %s", exc)
        try:
            out[prefix + "utilization_percentage"] = float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception as exc:
            log.debug("GPU utilization not read: %s", exc)
        try:
            milliwatts = pynvml.nvmlDeviceGetPowerUsage(handle)
            out[prefix + "power_usage_watts"] = round(milliwatts / 1000, 1)
            out[prefix + "power_usage_percentage"] = round(
                milliwatts / pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) * 100, 1)
        except Exception as exc:
            log.debug("GPU power not read: %s", exc)
        return out

    def sample() -> dict[str, float]:
        out: dict[str, float] = {}
        for i, handle in enumerate(handles):
            out.update(read(handle, f"gpu_{i}_"))
        return out

    return sample


def _cuda_uuid(device_index: int) -> str:
    import torch

    return str(torch.cuda.get_device_properties(device_index).uuid)
