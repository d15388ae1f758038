"""Collectives for one tensor-parallel group per process (`tidal.distributed.group`).

Models call `all_reduce` / `all_gather` only when they are built with `tp_size > 1`, so a
single-device process never touches `torch.distributed`.
"""

from tidal.distributed.group import (all_gather, all_reduce, broadcast_step, destroy_tensor_parallel,
                                     init_tensor_parallel, receive_step, tp_rank, tp_size)

__all__ = ["all_gather", "all_reduce", "broadcast_step", "destroy_tensor_parallel", "init_tensor_parallel",
           "receive_step", "tp_rank", "tp_size"]
