"""Attacks sharded over the processes of a ``torchrun`` job.

``torchrun --nproc_per_node N -m lipverify attack ...``: every rank attacks the slice :func:`shard` of
the inputs -- whole batches, so each batch has the same inputs and (seeded by its first index, see
:func:`lipverify.attacks.evaluate.evaluate_robustness`) the same random numbers as in one process --
and :func:`gather` collects every rank's per-input results in rank order (``all_gather_object``: gloo
on CPUs, NCCL on GPUs) into one :class:`~lipverify.attacks.evaluate.RobustnessReport`.

Warnings
--------
The same batches on the same kernels give the same points; a different number of threads per
process can change the last bits of float32 results and so an attack's trajectory.
"""

from __future__ import annotations

import torch

from lipverify.attacks.evaluate import RobustnessReport
from lipverify.data.dataset import whole_batches

__all__ = ["shard", "gather"]


def shard(n: int, rank: int, world: int, batch_size: int) -> slice:
    """The slice of ``n`` inputs that rank ``rank`` of ``world`` attacks: a contiguous run of whole
    batches of ``batch_size`` (the last batch may be short)."""
    return whole_batches(n, rank, world, batch_size)


def gather(rep: RobustnessReport, world: int) -> RobustnessReport:
    """One report over every rank's inputs, in rank order (on every rank)."""
    import torch.distributed as dist

    mine = {"labels": rep.labels, "pred": rep.pred, "radius": rep.radius, "x_adv": rep.x_adv, "margin": rep.margin,
            "found_by": rep.found_by, "tried": rep.tried, "names": rep.names, "time_s": rep.time_s, "n": rep.n,
            "precision": rep.precision}
    parts: list = [None] * world
    dist.all_gather_object(parts, mine)

    def cat(key):
        return torch.cat([p[key] for p in parts])

    names = None if any(p["names"] is None for p in parts) else [nm for p in parts for nm in p["names"]]
    tried = next((p["tried"] for p in parts if p["tried"]), [])
    n = sum(p["n"] for p in parts)
    return RobustnessReport(n=n, norm=rep.norm, clip=rep.clip, strength=rep.strength, eps=rep.eps,
                            labels=cat("labels"), pred=cat("pred"), radius=cat("radius"), x_adv=cat("x_adv"),
                            margin=cat("margin"), found_by=[f for p in parts for f in p["found_by"]], tried=tried,
                            precision=parts[0]["precision"], time_s=max(p["time_s"] for p in parts), names=names,
                            notes=list(rep.notes) + [f"attacked by {world} processes (torchrun), {n} inputs in "
                                                     "rank order"])
