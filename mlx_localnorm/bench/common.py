"""Timing, machine description and atomic CSV output shared by the benchmarks."""

from __future__ import annotations

import csv
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx


def machine() -> str:
    """A short machine label: the Apple chip on a Mac, the CPU model and core count elsewhere."""
    if platform.system() == "Darwin":
        try:
            chip = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                  capture_output=True, text=True, timeout=5).stdout.strip()
            return chip or platform.machine()
        except OSError:
            return platform.machine()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} x{os.cpu_count()}"


def device() -> str:
    return "gpu" if mx.metal.is_available() else "cpu"


def time_ms(fn: Callable[[], object], warmup: int = 3, repeat: int = 10,
            sample_seconds: float = 0.02) -> float:
    """Median wall time of ``mx.eval(fn())`` in milliseconds, over ``repeat`` samples.

    Each sample runs the call enough times to last about ``sample_seconds``, so short
    kernels are not dominated by timer and dispatch noise.
    """
    for _ in range(warmup):
        mx.eval(fn())
    start = time.perf_counter()
    mx.eval(fn())
    once = max(time.perf_counter() - start, 1e-6)
    inner = max(1, int(sample_seconds / once))
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(inner):
            mx.eval(fn())
        samples.append((time.perf_counter() - start) / inner)
    return 1000 * statistics.median(samples)


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """Write dict rows to ``path`` atomically (temp file + rename); columns from the first row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", newline="", dir=path.parent, suffix=".tmp",
                                     delete=False) as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(f.name, 0o666 & ~umask)  # temp files are private (0600); results are not
    os.replace(f.name, path)
    return path


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """The rows as a Markdown table (for the README)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
