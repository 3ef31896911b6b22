"""Multi-process fine-tuning with PyTorch DDP, started by ``torchrun``.

``torchrun --nproc_per_node N -m lipverify finetune ...`` (or ``--nnodes``/``--rdzv-*`` for several
machines) starts N copies of the command with ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` set.
:func:`setup` initialises the process group from them (NCCL on CUDA, gloo on CPU), each rank takes
the contiguous slice ``rank`` of every global batch (``--batch-size`` is the *global* batch and must be a
multiple of the number of processes), and DDP averages the gradients, so N processes compute the same
steps as one process with the same global batch.  The power-iteration vectors are registered buffers of
the DDP-wrapped module: they are updated identically on every rank from identical weights and DDP
broadcasts them from rank 0 at every forward pass, so they cannot drift apart.  Per-example vectors of
the local loss are all-gathered after each step.  Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lipverify.errors import UserInputError


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialised: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate equally shaped tensors of every rank along dim 0 (rank order)."""
        if not self.enabled:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def broadcast_object(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shutdown(self) -> None:
        if self.initialised and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # pragma: no cover - best effort at exit
                pass


_CREATED = False  # whether setup() created the process group (finish() tears down only that one)


def finish(ok: bool) -> None:
    """Tear the process group down at the end of a job (a group left for interpreter exit can abort the
    process in gloo's destructor).  After a success the ranks meet at a barrier first; after an error
    they do not (another rank may never get there)."""
    global _CREATED
    if not (_CREATED and dist.is_available() and dist.is_initialized()):
        return
    _CREATED = False
    try:
        if ok:
            dist.barrier()
        dist.destroy_process_group()
    except Exception:  # pragma: no cover - best effort at exit
        pass


@contextlib.contextmanager
def process_group(device: str):
    """``with process_group(device) as ctx``: :func:`setup`, then :func:`finish` on the way out (after
    a barrier on success, without one after an error).  ``ctx.device`` is this rank's device."""
    ctx = setup(device)
    try:
        yield ctx
    except BaseException:
        finish(False)
        raise
    finish(True)


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def setup(device: str) -> DistContext:
    """Initialise the process group when started by torchrun; pick this rank's device.

    ``device``: the resolved ``--device`` (``cpu``, ``cuda``, ``cuda:N``).  Under torchrun with CUDA each
    rank uses ``cuda:LOCAL_RANK``.
    """
    if not launched_by_torchrun() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistContext(device=torch.device(device))
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserInputError("--device cuda under torchrun, but CUDA is not available")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        backend = "nccl"
    else:
        dev = torch.device(device)
        backend = "gloo"
    global _CREATED
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=60))
        _CREATED = True
    return DistContext(rank=rank, world=world, local_rank=local, device=dev, initialised=True)
