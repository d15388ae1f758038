"""The tensor-parallel process group of this process: setup, collectives, the step channel.

Owns two `torch.distributed` groups over the same ranks: the default group (NCCL on CUDA, gloo
on CPU) for the model's collectives, and a gloo group on the CPU for the step channel, over
which rank 0 broadcasts each step's packed `StepBatch` (one int64 length, then the int32
buffer; a negative length means "shut down").

Lifecycle: `init_tensor_parallel` once per process (every rank calls it; it returns when all
have joined) -> collectives, in the same order on every rank -> `destroy_tensor_parallel`
(then a process may init again, e.g. a test that builds several engines). A process that never
calls `init_tensor_parallel` is rank 0 of a group of one.

The step channel has no timeout: a follower of an idle server waits on it for as long as the
leader lives. A follower does not rely on it to notice a dead leader (see
`tidal.engine.tensor_parallel`).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT_S = 600.0
"""A model collective (or the join) that waits this long for a peer fails."""
STEP_CHANNEL_TIMEOUT = datetime.timedelta(days=365)


@dataclass(frozen=True)
class _Group:
    rank: int
    world_size: int
    step_channel: dist.ProcessGroup


_group: _Group | None = None


def init_tensor_parallel(rank: int, world_size: int, init_method: str | None = None, backend: str = "gloo", *,
                         store: dist.Store | None = None, device: torch.device | str | None = None) -> None:
    """Join the group as `rank` of `world_size`, by `init_method` (`tcp://host:port`) or a `store`.

    `backend`: `nccl` (CUDA tensors; `device` is this rank's GPU) or `gloo` (CPU)."""
    global _group
    if _group is not None:
        raise RuntimeError("this process is already in a tensor-parallel group")
    device_id = torch.device(device) if backend == "nccl" and device is not None else None
    dist.init_process_group(backend, init_method=None if store is not None else init_method, store=store,
                            rank=rank, world_size=world_size, device_id=device_id,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    step_channel = dist.new_group(backend="gloo", timeout=STEP_CHANNEL_TIMEOUT)
    _group = _Group(rank, world_size, step_channel)


def destroy_tensor_parallel() -> None:
    global _group
    if _group is None:
        return
    _group = None
    dist.destroy_process_group()


def tp_rank() -> int:
    return _group.rank if _group is not None else 0


def tp_size() -> int:
    return _group.world_size if _group is not None else 1


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the ranks, in place; returns `x`."""
    dist.all_reduce(x)
    return x


_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Every rank's `x`, concatenated along `dim` in rank order: [.., n, ..] -> [.., world * n, ..]."""
    world = tp_size()
    x = x.contiguous()
    out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x)  # rank r's x lands in rows [r * n0, (r + 1) * n0)
    dim = dim % x.dim()
    if dim == 0:
        return out
    # [world, *x.shape] -> world next to `dim`, then merged into it.
    return out.view(world, *x.shape).movedim(0, dim).flatten(dim, dim + 1)


def broadcast_step(packed: np.ndarray | None) -> None:
    """Rank 0: send one step's packed int32 buffer to the other ranks (None: tell them to stop)."""
    length = torch.tensor([-1 if packed is None else len(packed)], dtype=torch.int64)
    dist.broadcast(length, src=0, group=_group.step_channel)
    if packed is not None:
        dist.broadcast(torch.from_numpy(packed), src=0, group=_group.step_channel)


def receive_step() -> np.ndarray | None:
    """Other ranks: the next packed buffer rank 0 sent, or None when it said stop."""
    length = torch.empty(1, dtype=torch.int64)
    dist.broadcast(length, src=0, group=_group.step_channel)
    if int(length) < 0:
        return None
    packed = torch.empty(int(length), dtype=torch.int32)
    dist.broadcast(packed, src=0, group=_group.step_channel)
    return packed.numpy()
