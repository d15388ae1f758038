"""Tensor-parallel sharding of the llama-family model: which rank holds what, and the layers
whose math crosses ranks (their collectives are `tidal.parallel.group`'s).

With `size` ranks, rank `r` holds
- attention: query heads [r * H/size, (r+1) * H/size) and the matching kv heads, in the same
  fused [q; k; v] layout as an unsharded model (column-parallel qkv), and the matching columns of
  o_proj (row-parallel: each rank's output is a partial sum, all-reduced);
- MLP: rows [r * I/size, (r+1) * I/size) of gate and of up (column-parallel gate_up) and the
  matching columns of down_proj (row-parallel, all-reduced);
- MoE experts (`tidal.models.moe`): every expert's rows [r * I/size, (r+1) * I/size) of gate and
  up and the matching columns of down, I the expert's intermediate size; the router whole, so all
  ranks route alike; the weighted combine is a partial sum, all-reduced once;
- vocabulary: rows [r * V', (r+1) * V') of the embedding and the LM head, V' = ceil(V / size);
  the last rank's rows past V are zero padding. An id outside a rank's rows embeds to zeros there,
  so the all-reduced sum is the embedding; the logits of every rank are gathered and trimmed to V;
- norms (q/k norms are per head_dim, the same for every head) and RoPE: whole on every rank.

`TPShard(0, 1)` is an unsharded model: no layer here runs for it. Whether a model can be split
over a group is `tidal.models.arch.check_tensor_parallel`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tidal.parallel.group import all_gather, all_reduce


@dataclass(frozen=True)
class TPShard:
    rank: int = 0
    size: int = 1

    def __post_init__(self):
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} is outside a group of {self.size}")


def vocab_per_rank(vocab_size: int, tp_size: int) -> int:
    return -(-vocab_size // tp_size)


def shard_rows(tensor: torch.Tensor, dim: int, shard: TPShard, rows: int) -> torch.Tensor:
    """Rank `shard.rank`'s `rows` entries of a full tensor along `dim` (fewer at a padded end)."""
    start = shard.rank * rows
    return tensor.narrow(dim, start, max(0, min(rows, tensor.shape[dim] - start)))


def vocab_parallel_embedding(input_ids: torch.Tensor, weight: torch.Tensor, vocab_start: int) -> torch.Tensor:
    """input_ids [T] (ids of the whole vocabulary), weight [V', hidden] (this rank's rows from
    `vocab_start`) -> [T, hidden], summed over the ranks."""
    local = input_ids - vocab_start
    outside = (local < 0) | (local >= weight.shape[0])
    hidden = F.embedding(local.masked_fill(outside, 0), weight)
    return all_reduce(hidden.masked_fill_(outside.unsqueeze(-1), 0))


def vocab_parallel_logits(hidden: torch.Tensor, weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """hidden [N, hidden], weight [V', hidden] -> logits [N, vocab_size] (every rank's, gathered)."""
    logits = all_gather(F.linear(hidden, weight), dim=-1)  # [N, size * V']
    return logits if logits.shape[-1] == vocab_size else logits[:, :vocab_size].contiguous()


def row_parallel_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, in / size] (this rank's columns), weight [out, in / size] -> [T, out], summed over ranks."""
    return all_reduce(F.linear(x, weight))
