"""How many CPU cores this process may use, and torch threads to match.

torch sizes its thread pool by the host's cores; a container's CPU quota (a Kubernetes pod limited to 2 CPUs on
a 64-core node) is what the process may actually run on, and more threads than that only queue. loky's count
honours affinity (`taskset`, cpusets), the quota and `LOKY_MAX_CPU_COUNT`.
"""
from __future__ import annotations


def available_cores() -> int:
    from joblib import cpu_count

    return max(1, int(cpu_count()))


def set_torch_threads(requested: int | None = None) -> int:
    """`requested` threads, or torch's default capped at the available cores; returns the count set."""
    import torch

    threads = requested or min(torch.get_num_threads(), available_cores())
    torch.set_num_threads(threads)
    return threads
