"""Where a checkpoint tensor goes: `WeightSlot`, and the empty parameters that slots point into.

Shared by the model's modules (`tidal.models.llama`, `tidal.models.moe`), which allocate their
parameters empty in the target dtype and device and let a loader fill them slot by slot.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


def empty_parameter(shape, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    """An uninitialized, frozen parameter: a loader (or dummy init) writes every element."""
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class WeightSlot(NamedTuple):
    target: torch.Tensor
    """The parameter, or slice of a fused one, that a checkpoint tensor fills."""
    split_dim: int | None = None
    """The checkpoint tensor's dim that tensor-parallel ranks split; None: each rank holds it whole."""
