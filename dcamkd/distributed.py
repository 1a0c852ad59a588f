"""Multi-process (multi-GPU, multi-node) training helpers for ``torchrun`` + DistributedDataParallel.

``torchrun`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`setup` reads them and joins the process group (``nccl`` for CUDA devices, ``gloo`` for
CPU). The trainer (:class:`dcamkd.train.Trainer`) then:

* shards each epoch's permutation by rank (:func:`shard_batch`): every rank draws the same seeded
  permutation, pads it by wrapping to a multiple of the world size (as ``DistributedSampler``
  does), cuts it into global batches of ``--batch-size`` images and gives each rank a contiguous
  ``batch_size / world_size`` slice of every global batch. The step budget, the steps per epoch
  and the learning rate therefore mean what they mean in a single process;
* wraps the student and the DCAM side branch in one ``DistributedDataParallel`` module, which
  averages gradients over ranks. Batch norm is per rank (no SyncBatchNorm): each rank normalises
  its micro-batch with its own statistics, exactly as a single process that runs the per-rank
  micro-batches separately and averages their gradients; running statistics are rank 0's
  (broadcast at every forward, and before validation and checkpoints);
* caches teacher features per rank, validates a shard of the validation images per rank and
  sums the scores over ranks (:func:`all_reduce_sum`);
* writes checkpoints, ``log.json``, ``split.json`` and progress output on rank 0 only.

Evaluation (:func:`dcamkd.evaluate.evaluate` under ``torchrun``): every rank scores a contiguous
shard of each category's test set (:func:`shard_range`), the metric accumulators are gathered to
rank 0 (:func:`gather_to_main`), merged in rank order (so in the order of one pass) and scored
there; the results are broadcast back to every rank (:func:`broadcast_from_main`).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from .errors import InvalidArgumentError

__all__ = ["env_world_size", "setup", "is_distributed", "rank", "world_size", "is_main", "shard_batch",
           "pad_permutation", "all_reduce_sum", "barrier", "broadcast_buffers", "teardown", "shard_range",
           "gather_to_main", "broadcast_from_main"]

_JOINED = False  # whether setup() created the process group (teardown() destroys only that one)


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise InvalidArgumentError(f"WORLD_SIZE: expected an int, got {os.environ['WORLD_SIZE']!r}") from None


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 outside a process group)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 outside a process group)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return rank() == 0


def setup(device: str) -> tuple[bool, str]:
    """Join the ``torchrun`` process group when ``WORLD_SIZE > 1``.

    Args:
        device: the configured device, ``'cpu'``, ``'cuda'`` or ``'cuda:N'``.

    Returns:
        ``(distributed, device)``: with ``device='cuda'`` each process uses ``cuda:LOCAL_RANK``.

    Raises:
        InvalidArgumentError: ``WORLD_SIZE > 1`` without ``RANK``/``MASTER_ADDR`` (not started by
            ``torchrun``), or ``torch.distributed`` unavailable.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist_on = dist.get_world_size() > 1
    else:
        if env_world_size() <= 1:
            return False, device
        if not dist.is_available():
            raise InvalidArgumentError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise InvalidArgumentError(
                f"WORLD_SIZE > 1 but {', '.join(missing)} not set: start multi-process training with "
                f"torchrun --nproc_per_node=N -m dcamkd.cli train ...")
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        global _JOINED
        _JOINED = True
        dist_on = dist.get_world_size() > 1
    if dist_on and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return dist_on, device


def pad_permutation(perm: Tensor, world: int) -> Tensor:
    """Append the permutation's first entries so its length is a multiple of ``world``
    (``DistributedSampler``'s padding; a few images appear twice in that epoch)."""
    pad = (-len(perm)) % world
    if pad == 0:
        return perm
    reps = -(-pad // max(len(perm), 1))
    return torch.cat([perm, perm.repeat(reps)[:pad]])


def shard_batch(batch: Tensor, rank_: int, world: int) -> Tensor:
    """This rank's contiguous slice of a global batch whose length is a multiple of ``world``.

    Raises:
        InvalidArgumentError: the length is not a multiple of ``world``.
    """
    if len(batch) % world:
        raise InvalidArgumentError(f"global batch of {len(batch)} images does not split over {world} ranks")
    per = len(batch) // world
    return batch[rank_ * per:(rank_ + 1) * per]


def shard_range(n: int, rank_: int, world: int) -> range:
    """Rank ``rank_``'s contiguous part of ``range(n)``: the ranks' parts are in rank order, cover
    ``range(n)`` once and differ in length by at most one (the first ``n % world`` ranks get one
    more). A rank may get an empty range when ``n < world``.

    Raises:
        InvalidArgumentError: ``world < 1``, ``rank_`` outside ``[0, world)`` or ``n < 0``.
    """
    if world < 1 or not 0 <= rank_ < world or n < 0:
        raise InvalidArgumentError(f"shard_range: expected n >= 0 and 0 <= rank < world, got {n}, {rank_}, {world}")
    base, extra = divmod(n, world)
    start = rank_ * base + min(rank_, extra)
    return range(start, start + base + (1 if rank_ < extra else 0))


def gather_to_main(obj) -> Optional[list]:
    """Every rank's picklable ``obj``, as a list in rank order, on rank 0; None on the other
    ranks. ``[obj]`` in a single process. Every rank must call it."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj):
    """Rank 0's picklable ``obj`` on every rank (``obj`` itself in a single process). Every rank
    must call it; the other ranks' ``obj`` is ignored."""
    if not is_distributed():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: Sequence[float], device) -> list[float]:
    """Sum floats over ranks (float64); identity in a single process."""
    if not is_distributed():
        return [float(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_buffers(module: Optional[torch.nn.Module]) -> None:
    """Copy rank 0's buffers (batch-norm running statistics) to every rank."""
    if module is None or not is_distributed():
        return
    import torch.distributed as dist

    for b in module.buffers():
        dist.broadcast(b.data, src=0)


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


def teardown(sync: bool = True) -> None:
    """Destroy the process group if :func:`setup` created it (a caller's own group is kept).

    Args:
        sync: wait for every rank first (a normal exit). A rank that leaves while another still
            works with the group can make gloo abort the other process; after an error the other
            ranks may never arrive, so the command line passes False there.
    """
    global _JOINED
    if _JOINED:
        import torch.distributed as dist

        if dist.is_initialized():
            if sync:
                dist.barrier()
            dist.destroy_process_group()
        _JOINED = False
