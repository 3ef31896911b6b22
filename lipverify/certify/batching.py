"""Batches for certification: sized from free memory, moved to the device ahead of use.

:func:`auto_batch_size` picks the batch when the user gives none: a quarter of the free memory of the
device (``torch.cuda.mem_get_info`` on GPUs, ``MemAvailable`` of ``/proc/meminfo`` on CPUs) divided by
the memory one example needs (every node's output in float64, twice), between 16 and a cap (8192 on
GPUs; on CPUs 1024, and at most what keeps one batch's float32 activations of all nodes within
:data:`CPU_WORKING_SET`: beyond the caches the elementwise passes of the rounding bounds run at memory
speed: on a 2-core CPU, Convnet_maxpool certified 7.7k inputs/s with batches of 1000 and 18.5k with
the 86 this picks, resnet_2b 11.0k and 16.6k with 224).  :func:`stream` yields ``(start, batch)`` with
each batch already on the device: from pinned host memory with a non-blocking copy issued one batch
ahead on CUDA (the copy of the next batch overlaps the work on this one), plain slices on CPUs.

Warnings
--------
The estimate ignores what other processes allocate meanwhile; a batch that does not fit raises the
usual out-of-memory error -- give ``--batch-size`` then.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

__all__ = ["auto_batch_size", "free_memory", "stream"]

CPU_CAP = 1024
#: bytes of float32 activations (all nodes) one CPU batch may take
CPU_WORKING_SET = 16 << 20
GPU_CAP = 8192
MIN_BATCH = 16


def free_memory(device: torch.device) -> int:
    """Free bytes on ``device`` (CUDA: the driver's count; CPU: ``MemAvailable``, else 4 GiB)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def auto_batch_size(graph, device, n: int) -> int:
    """A batch size for certifying ``n`` inputs of ``graph`` on ``device`` (module docstring)."""
    device = torch.device(device)
    per_example = 0
    for node in graph.nodes:
        per_example += math.prod(int(s) for s in node.out_shape)
    cap = GPU_CAP
    if device.type != "cuda":
        cap = min(CPU_CAP, max(MIN_BATCH, CPU_WORKING_SET // (4 * max(1, per_example))))
    per_example = max(1, 2 * 8 * per_example)
    b = int(free_memory(device) // 4 // per_example)
    return max(1, min(max(b, MIN_BATCH), cap, max(n, 1)))


def stream(x: torch.Tensor, batch_size: int, device) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, x[start:start + batch_size] on device)`` for every batch, copied one batch ahead."""
    device = torch.device(device)
    n = len(x)
    if device.type != "cuda" or x.device.type == "cuda":
        for s in range(0, n, batch_size):
            yield s, x[s:s + batch_size].to(device)
        return
    host = x if x.is_pinned() else x.pin_memory()
    nxt = host[0:batch_size].to(device, non_blocking=True) if n else None
    for s in range(0, n, batch_size):
        cur = nxt
        if s + batch_size < n:
            nxt = host[s + batch_size:s + 2 * batch_size].to(device, non_blocking=True)
        yield s, cur
