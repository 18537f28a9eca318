"""tracking/system_metrics.py: one sample carries the names MLflow's system metrics use (so existing
dashboards keep working) with values that agree with psutil; one sample per second-step; a sampler
that fails costs its own metrics, never the caller."""
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from ldot.tracking import system_metrics
from ldot.tracking.system_metrics import SystemMetrics

HOST_KEYS = {"cpu_utilization_percentage", "system_memory_usage_megabytes", "system_memory_usage_percentage",
             "disk_usage_percentage", "disk_usage_megabytes", "disk_available_megabytes",
             "network_receive_megabytes", "network_transmit_megabytes", "process_memory_rss_megabytes"}


def _another_filesystem(tmp_path) -> Path:
    """A directory on another filesystem than / where there is one (tmpfs /dev/shm), so that the
    disk metrics show which filesystem they measure."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and os.stat(shm).st_dev != os.stat(os.sep).st_dev:
        return shm
    return tmp_path


def _burn(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_one_sample_has_mlflows_names_and_sane_values(tmp_path):
    disk = _another_filesystem(tmp_path)
    sampler = SystemMetrics(lambda metrics, step: None, time.time(), 10.0, disk_path=disk)
    _burn(0.2)  # half a core busy at least, whatever else runs
    got: dict = {}
    thread = threading.Thread(target=lambda: got.update(sampler.sample()))  # as on the sampling thread
    thread.start()
    thread.join()

    assert HOST_KEYS <= got.keys(), HOST_KEYS - got.keys()
    assert all(isinstance(v, float) and math.isfinite(v) for v in got.values()), got
    assert 50 / os.cpu_count() <= got["cpu_utilization_percentage"] <= 100
    memory = psutil.virtual_memory()
    assert 0 < got["system_memory_usage_megabytes"] <= memory.total / 1e6
    assert 0 < got["system_memory_usage_percentage"] <= 100
    usage = psutil.disk_usage(str(disk))
    slack = max(0.01 * usage.total, 50e6) / 1e6
    assert abs(got["disk_available_megabytes"] - usage.free / 1e6) <= slack, (disk, got)
    assert abs(got["disk_usage_megabytes"] - usage.used / 1e6) <= slack, (disk, got)
    assert 0 <= got["disk_usage_percentage"] <= 100
    assert got["network_receive_megabytes"] >= 0 and got["network_transmit_megabytes"] >= 0
    rss = psutil.Process().memory_info().rss / 1e6
    assert 0.5 * rss <= got["process_memory_rss_megabytes"] <= 2 * rss


def test_at_most_one_sample_per_second_step(tmp_path, monkeypatch):
    clock = [1000.2]
    monkeypatch.setattr(system_metrics, "time", SimpleNamespace(time=lambda: clock[0]))
    emitted = []
    sampler = SystemMetrics(lambda metrics, step: emitted.append(step), 1000.0, 1.0, disk_path=tmp_path)
    for now in (1000.2, 1000.9, 1001.0, 1001.5, 1003.7):
        clock[0] = now
        sampler._sample_and_emit()
    assert emitted == [0, 1, 3]


def test_a_failing_sampler_costs_its_own_metrics_only(tmp_path, caplog):
    emitted = []
    sampler = SystemMetrics(lambda metrics, step: emitted.append(metrics), time.time() - 5, 0.01, disk_path=tmp_path)

    def broken():
        raise OSError("disk gone")

    sampler.samplers["disk"] = broken
    with caplog.at_level(logging.WARNING, logger="ldot.tracking"):
        first, second = sampler.sample(), sampler.sample()
    for got in (first, second):
        assert "cpu_utilization_percentage" in got and "disk_usage_percentage" not in got
    assert len([r for r in caplog.records if "disk gone" in r.getMessage()]) == 1, "reported once"

    sampler.start()  # on its thread, through stop(): emits what works
    time.sleep(0.05)
    sampler.stop()
    assert emitted and all("cpu_utilization_percentage" in m for m in emitted)


def test_an_emit_that_fails_does_not_reach_the_caller(tmp_path):
    def emit(metrics, step):
        raise RuntimeError("outbox disk full")

    SystemMetrics(emit, time.time(), 1.0, disk_path=tmp_path)._sample_and_emit()


class FakeNvml:
    """NVML as nvidia-ml-py presents it, for two GPUs: this machine has none, and the point is which
    GPU a rank reports and under which names."""

    def __init__(self):
        self.gpus = [{"uuid": "GPU-aaaa", "used": 1e9, "total": 80e9, "util": 10, "mw": 100_000, "limit": 700_000},
                     {"uuid": "GPU-bbbb", "used": 40e9, "total": 80e9, "util": 97, "mw": 650_000, "limit": 700_000}]

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.gpus[i]

    def nvmlDeviceGetUUID(self, h):
        return h["uuid"]

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=h["used"], total=h["total"], free=h["total"] - h["used"])

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=h["util"], memory=0)

    def nvmlDeviceGetPowerUsage(self, h):
        return h["mw"]

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return h["limit"]


@pytest.fixture
def nvml(monkeypatch):
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(system_metrics, "_cuda_uuid", lambda index: ["aaaa", "bbbb"][index])
    return fake


def test_a_rank_reports_its_own_gpu_under_mlflows_names(tmp_path, nvml):
    got = SystemMetrics(lambda m, s: None, time.time(), 1.0, device_index=1, disk_path=tmp_path).sample()
    gpu = {k: v for k, v in got.items() if k.startswith("gpu_")}
    assert gpu == {"gpu_0_memory_usage_megabytes": 40000.0, "gpu_0_memory_usage_percentage": 50.0,
                   "gpu_0_utilization_percentage": 97.0, "gpu_0_power_usage_watts": 650.0,
                   "gpu_0_power_usage_percentage": 92.9}


def test_without_its_device_a_process_reports_every_gpu(tmp_path, nvml):
    got = SystemMetrics(lambda m, s: None, time.time(), 1.0, disk_path=tmp_path).sample()
    assert got["gpu_0_utilization_percentage"] == 10.0 and got["gpu_1_utilization_percentage"] == 97.0


def test_what_a_gpu_cannot_tell_is_left_out(tmp_path, nvml):
    def unsupported(handle):
        raise RuntimeError("NVMLError_NotSupported")

    nvml.nvmlDeviceGetPowerUsage = unsupported
    got = SystemMetrics(lambda m, s: None, time.time(), 1.0, device_index=0, disk_path=tmp_path).sample()
    assert got["gpu_0_utilization_percentage"] == 10.0 and "gpu_0_power_usage_watts" not in got
