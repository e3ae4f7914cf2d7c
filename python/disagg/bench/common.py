"""Timing helpers shared by the benchmark families.

CPU timings use ``torch.utils.benchmark`` (median of adaptive runs); CUDA timings use CUDA
events. Every row compares the op with a baseline measured in the same run.
"""
from __future__ import annotations

import platform
from typing import Callable, Optional

import torch
import torch.utils.benchmark as tbench


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def median_time(fn: Callable[[], object], device: torch.device, min_run_time: float = 0.3) -> float:
    """Median seconds per call of ``fn``."""
    if device.type == "cuda":
        for _ in range(3):
            fn()
        torch.cuda.synchronize(device)
        times = []
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        reps = 0
        total = 0.0
        while total < min_run_time * 1000 or reps < 10:
            start.record()
            fn()
            end.record()
            end.synchronize()
            t = start.elapsed_time(end)
            times.append(t)
            total += t
            reps += 1
        times.sort()
        return times[len(times) // 2] / 1000.0
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.adaptive_autorange(min_run_time=min_run_time).median


def copy_time(nbytes: int, device: torch.device, min_run_time: float = 0.3,
              fresh: bool = False) -> float:
    """Median seconds of one plain copy of ``nbytes`` (reads n = nbytes/2, writes n).

    ``fresh=False``: ``copy_`` between two preallocated buffers, the memory-bandwidth roofline.
    ``fresh=True``: a copy into a newly allocated tensor, what any op returning a new tensor
    pays (a fresh large buffer costs page faults on the CPU).
    """
    n = max(1, nbytes // 2)
    a = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    if fresh:
        return median_time(lambda: torch.empty_like(a).copy_(a), device, min_run_time)
    b = torch.empty_like(a)
    return median_time(lambda: b.copy_(a), device, min_run_time)


def row(*, op: str, device: torch.device, shape: dict, dtype, median_s: float,
        baseline: str, baseline_median_s: float, nbytes: Optional[int] = None,
        copy_s: Optional[float] = None, **extra) -> dict:
    """One benchmark result in the JSON row format of DESIGN.md."""
    r = {
        "op": op,
        "device": device_name(device),
        "shape": shape,
        "dtype": str(dtype).replace("torch.", ""),
        "median_s": median_s,
        "bytes_per_s": (nbytes / median_s) if nbytes else None,
        "baseline": baseline,
        "baseline_median_s": baseline_median_s,
        "speedup": baseline_median_s / median_s,
        "copy_ratio": (copy_s / median_s) if (nbytes and copy_s) else None,
    }
    r.update(extra)
    return r


def format_table(rows: list[dict]) -> str:
    head = (f"{'op':<22} {'shape':<38} {'dtype':<9} {'median':>10} {'GB/s':>8} {'vs copy_':>8} "
            f"{'vs clone':>8} {'speedup':>8}  baseline")
    out = [head, "-" * len(head)]
    for r in rows:
        shape = ",".join(f"{k}={v}" for k, v in r["shape"].items())
        gbs = f"{r['bytes_per_s'] / 1e9:.2f}" if r.get("bytes_per_s") else "-"
        cr = f"{r['copy_ratio']:.2f}x" if r.get("copy_ratio") else "-"
        # ops that allocate their output also show the ratio to a copy into a fresh tensor
        fr = f"{r['fresh_buffer_copy_ratio']:.2f}x" if r.get("fresh_buffer_copy_ratio") else "-"
        out.append(
            f"{r['op']:<22} {shape:<38.38} {r['dtype']:<9} {r['median_s'] * 1e6:>8.1f}us {gbs:>8} "
            f"{cr:>8} {fr:>8} {r['speedup']:>7.2f}x  {r['baseline']}"
        )
    return "\n".join(out)
