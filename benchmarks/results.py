"""Bookkeeping shared by the benchmark scripts: the device line, and appending a run to one
`## name` section of RESULTS.md."""
from __future__ import annotations

import os
import platform
from pathlib import Path

# LDOT_RESULTS points the benchmarks at another copy (benchmarks/gpu_session.sh records into $OUT).
RESULTS = Path(os.environ.get("LDOT_RESULTS") or Path(__file__).resolve().parent / "RESULTS.md")

# Dense bf16 Tensor Core peaks from the datasheets, in TFLOP/s, by device name fragment (H200 has the
# H100's compute with faster memory).
BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L4": 121.0, "A10": 125.0}


def bf16_peak_tflops(device_name: str) -> float | None:
    """The datasheet bf16 peak of a GPU named `device_name`, None when it is not in the table."""
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in device_name), None)


def device(gpu: bool = True) -> str:
    """The GPU's name when torch sees one (and `gpu`), else the CPU model and core count; with torch's
    version. Benchmarks of host-side work (the loader) pass gpu=False."""
    import torch

    if gpu and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} (CPU)"


def append_run(section: str, text: str, path: Path = RESULTS) -> None:
    """Append `text` at the end of the `## section` part (created at the end if absent); other
    sections are left as they are."""
    content = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = content.splitlines()
    head = f"## {section}"
    if head not in lines:
        lines += ["", head]
    start = lines.index(head)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    gap = [""] if end < len(lines) and lines[end].strip() else []  # keep a blank line before the next section
    lines[end:end] = ["", *text.rstrip().splitlines(), *gap]
    path.write_text("\n".join(lines).rstrip() + "\n")
