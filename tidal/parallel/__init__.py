"""Tensor parallelism: one model split over the ranks of a group of processes.

- `group`: this process's membership in the group, the collectives (`all_reduce`, `all_gather`)
  and the step channel over which rank 0 sends each step to the others.
- `sharding`: which rank holds which rows and columns of the model, and the layers whose math
  crosses ranks (vocab-parallel embedding and logits, row-parallel linear).

Both sit below `tidal.models`, which calls them only when built with `tp_size > 1`, so a
single-device process never touches `torch.distributed`. Whether a model can be split is
`tidal.models.arch.check_tensor_parallel`; the processes of a group (rank 0 runs the engine and
spawns ranks 1..) are `tidal.engine.tensor_parallel`.
"""
