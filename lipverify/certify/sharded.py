"""Certification sharded over the processes of a ``torchrun`` job.

``torchrun --nproc_per_node N -m lipverify certify ...``: every rank loads the model and computes the
constants itself (they are the same on every rank), certifies the contiguous slice
:func:`shard` of the inputs -- whole batches of the batch size one process would use
(:func:`batch_size_for`), so each rank runs the same batches as one process -- and :func:`gather`
collects the per-input tensors of all ranks in rank order (``all_gather_object`` over the default process group: gloo on CPUs, NCCL on GPUs) and
recomputes the summary with :func:`lipverify.certify.rules.summarise`, so rank 0 holds the result of
one process over all inputs: the same JSON, the same certificates.

Warnings
--------
With ``--precision float64`` every rank runs the batches of one process (unless there were fewer
batches than ranks, see above: then the last bits may differ), so margins and radii are
the same numbers as long as the kernels round a batch the same way with one thread per rank as with
the threads of one process (the benchmark and the tests check it on CPUs).  With float32 logits (the
default) each rank probes its own first inputs and recomputes its own open inputs in float64 (other
batches, which round differently in the last bits): radii agree within the proven rounding bound,
and every decision is the same.
"""

from __future__ import annotations

import torch

from lipverify.certify.rules import CertifyResult, summarise
from lipverify.data.dataset import whole_batches

__all__ = ["batch_size_for", "shard", "gather"]


def batch_size_for(n: int, world: int, auto: int) -> int:
    """The batch of a sharded run without ``--batch-size``: ``auto``, the one one process would pick
    (rank 0's choice, the same on every rank), so the ranks run the one-process batches; when that
    gives fewer batches than ranks, ``n // world`` instead (at least ``world`` batches, so that every
    rank works; its batches then differ from one process's, and float64 results may differ in the last
    bits)."""
    return auto if -(-n // auto) >= world else max(1, n // world)


def shard(n: int, rank: int, world: int, batch_size: int) -> slice:
    """The slice of ``n`` inputs that rank ``rank`` of ``world`` certifies: whole batches of
    ``batch_size`` (:func:`lipverify.data.dataset.whole_batches`)."""
    return whole_batches(n, rank, world, batch_size)


def gather(res: CertifyResult, world: int) -> CertifyResult:
    """One :class:`CertifyResult` over every rank's inputs, in rank order (on every rank)."""
    import torch.distributed as dist

    mine = {"pred": res.pred, "label": res.label, "margin": res.margin, "radius": res.radius, "sound": res.sound,
            "method_code": res.method_code, "cert_at": res.all_certified_at, "names": res.names,
            "notes": res.notes, "time_s": res.time_s, "n": res.n}
    parts: list = [None] * world
    dist.all_gather_object(parts, mine)

    def cat(key):
        return torch.cat([p[key] for p in parts])
    keys = list(parts[0]["cert_at"])
    cert_at = {k: torch.cat([p["cert_at"][k] for p in parts]) for k in keys}
    names = None if any(p["names"] is None for p in parts) else [nm for p in parts for nm in p["names"]]
    n = sum(p["n"] for p in parts)
    notes = list(parts[0]["notes"]) + [f"certified by {world} processes (torchrun), {n} inputs in rank order"]
    return summarise(res.norm, res.method, res.eps, res.per_example_eps, cat("pred"), cat("label"), cat("margin"),
                     cat("radius"), cat("sound"), cat("method_code"), cert_at, notes, names,
                     max(p["time_s"] for p in parts))
