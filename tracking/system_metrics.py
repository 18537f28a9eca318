"""Each rank's machine, sampled on a daemon thread: CPU, memory, disk, network, and the GPU when
nvidia-ml-py is installed; the samples go through the tracker's outbox like every other record."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

log = logging.getLogger("ldot.tracking")


class SystemMetrics:
    """MLflow's system monitors (CPU, memory, disk, network; NVIDIA GPU when nvidia-ml-py is installed,
    restricted to this rank's GPU) plus this process's own memory, sampled on a daemon thread.

    MLflow's SystemMetricsMonitor itself stops for good at the first failed request; here samples go to
    the outbox like every other record."""

    def __init__(self, emit: Callable[[dict, int], None], started_at: float, interval_s: float,
                 device_index: int | None = None):
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

        self.monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor(), _ProcessMonitor()]
        gpu = _gpu_monitor(device_index)
        if gpu is not None:
            self.monitors.append(gpu)
        self.emit, self.started_at, self.interval_s = emit, started_at, interval_s
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

    def _sample_and_emit(self) -> None:
        try:
            metrics: dict[str, float] = {}
            for monitor in self.monitors:
                monitor.collect_metrics()
                metrics.update(monitor.aggregate_metrics())
                monitor.clear_metrics()
            step = int(time.time() - self.started_at)
            if step != self._last_step:  # one sample a second at most (stop() right after one)
                self.emit(metrics, step)
                self._last_step = step
        except Exception as exc:  # a sampler must never take training down
            log.debug("system metrics sample failed: %s", exc)


class _ProcessMonitor:
    """This rank's own resident memory and, on GPU, the memory torch holds (the node's totals are
    shared by every rank on it). The interface of MLflow's monitors."""

    def __init__(self):
        import psutil

        self._proc, self._metrics = psutil.Process(), {}

    def collect_metrics(self):
        import torch

        samples = {"process_memory_rss_megabytes": self._proc.memory_info().rss / 1e6}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            samples["torch_cuda_max_allocated_megabytes"] = torch.cuda.max_memory_allocated() / 1e6
        for k, v in samples.items():
            self._metrics[k] = max(v, self._metrics.get(k, v))

    def aggregate_metrics(self):
        return {k: round(v, 1) for k, v in self._metrics.items()}

    def clear_metrics(self):
        self._metrics = {}


def _gpu_monitor(device_index: int | None):
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        monitor = GPUMonitor()
    except Exception:  # no nvidia-ml-py, or no GPU
        return None
    if device_index is not None:
        try:
            import pynvml
            import torch

            want = str(torch.cuda.get_device_properties(device_index).uuid)
            mine = [h for h in monitor.gpu_handles if want in str(pynvml.nvmlDeviceGetUUID(h))]
            if mine:
                monitor.gpu_handles = mine
        except Exception as exc:
            log.debug("GPU monitor reports every GPU of the node: %s", exc)
    return monitor
