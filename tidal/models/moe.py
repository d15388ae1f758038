"""Sparse mixture-of-experts MLP (Qwen3-MoE, Mixtral, gpt-oss): a router and stacked experts.

`SparseMoE` owns one layer's router and experts' weights and no per-request state. Layout, with
E experts and I = moe_intermediate_size / tp_size intermediate rows per expert on this rank:
  gate_weight  [E, hidden]         the router, whole on every tensor-parallel rank
  w13          [E, 2 * I, hidden]  per expert: gate_proj (Mixtral w1) rows, then up_proj (w3) rows;
                                   gpt-oss: gate and up rows interleaved (gate j at row 2j, up j
                                   at 2j + 1), its checkpoints' order
  w2           [E, hidden, I]      per expert: down_proj (Mixtral w2)
gpt-oss adds biases (`arch.moe_bias`): gate_bias [E], w13_bias [E, 2 * I] (interleaved like w13),
w2_bias [E, hidden]. Its checkpoints hold each layer's experts stacked, transposed against
Tidal's layout (`mlp.experts.gate_up_proj` [E, hidden, 2 * I], `down_proj` [E, I, hidden]), so
their slots are transposed views of w13 and w2.
Tensor parallel (see `tidal.parallel.sharding`): each rank holds every expert's slice of the
intermediate rows, so its combined output is a partial sum, and one all-reduce after the combine
finishes the layer, as for the dense MLP; the down bias is added on rank 0 only, so it counts
once in that sum. (Interleaved rows split into whole (gate, up) pairs: rank r's 2 * I rows are
pairs r * I .. (r + 1) * I - 1.) `LlamaModel.load_weight` writes each checkpoint expert tensor
into its slice of the stacked tensors, one at a time.

`moe_forward` is the one boundary the fused GPU kernels replace: hidden states, router logits and
the stacked weights in, the combined output out. On CUDA it runs `tidal.kernels.fused_moe` (two
grouped Triton GEMMs, no host sync, so CUDA graphs can capture it). Its torch path here (CPU, and
its reference) groups the (token, expert) pairs by expert and runs one pair of matmuls per expert
that has tokens; it reads the per-expert counts on the host, so it is not for CUDA-graph capture.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from tidal.kernels import fused_moe
from tidal.models.arch import ModelArch
from tidal.models.layers import clamped_swiglu, silu_and_mul
from tidal.models.weight_slot import WeightSlot, empty_parameter
from tidal.parallel.group import all_reduce
from tidal.parallel.sharding import TPShard

# Checkpoint names per architecture with one tensor per expert: (the layer's MoE module, gate, up and
# down projections). The others (gpt-oss) stack each layer's experts: `SparseMoE._stacked_slots`.
_CHECKPOINT_NAMES = {"qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
                     "mixtral": ("block_sparse_moe", "w1", "w3", "w2")}


def select_experts(router_logits: torch.Tensor, top_k: int,
                   renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k] float32, expert ids [T, k] int64).

    Softmax over all experts in float32, then the top k. Renormalizing them to sum to 1 is the same
    as a softmax over the top-k logits alone (Mixtral's formulation)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, expert_ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, expert_ids


Activation = Callable[[torch.Tensor], torch.Tensor]
"""[N, 2I] gate_up -> [N, I]: `silu_and_mul`, or `expert_activation(arch)` for the model's."""


def expert_activation(arch: ModelArch) -> Activation:
    if arch.expert_activation == "swiglu_clamped":
        return partial(clamped_swiglu, alpha=arch.swiglu_alpha, limit=arch.swiglu_limit)
    return silu_and_mul


def kernel_activation(activation: Activation) -> fused_moe.ExpertActivation | None:
    """The fused kernel's form of `silu_and_mul` or `expert_activation`'s clamped SwiGLU (interleaved
    gate/up rows), or None for any other callable (the torch path runs it)."""
    if activation is silu_and_mul:
        return fused_moe.ExpertActivation(fused_moe.SILU, interleaved=False)
    if isinstance(activation, partial) and activation.func is clamped_swiglu and not activation.args:
        alpha, limit = activation.keywords["alpha"], activation.keywords["limit"]
        return fused_moe.ExpertActivation(fused_moe.CLAMPED_SWIGLU, interleaved=True, alpha=alpha,
                                          limit=limit)
    return None


def moe_forward(hidden: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                top_k: int, renormalize: bool, activation: Activation = silu_and_mul,
                w13_bias: torch.Tensor | None = None, w2_bias: torch.Tensor | None = None) -> torch.Tensor:
    """hidden [T, H], router_logits [T, E], w13 [E, 2I, H], w2 [E, H, I] (biases [E, 2I], [E, H]
    or None) -> [T, H]: per token, the sum over its top-k experts of
    weight * down(activation(gate_up(x)))."""
    weights, expert_ids = select_experts(router_logits, top_k, renormalize)
    fused = kernel_activation(activation) if fused_moe.usable(hidden) else None
    if fused is not None:  # CUDA: two grouped Triton GEMMs, no host sync (CUDA-graph capturable)
        return fused_moe.fused_experts(hidden, weights, expert_ids, w13, w2, fused, w13_bias, w2_bias)
    return grouped_experts(hidden, weights, expert_ids, w13, w2, activation, w13_bias, w2_bias)


def grouped_experts(hidden: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                    w13: torch.Tensor, w2: torch.Tensor, activation: Activation = silu_and_mul,
                    w13_bias: torch.Tensor | None = None, w2_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The torch path: sort the T * k (token, expert) pairs by expert, one gate_up and one down
    matmul per expert that has pairs, scale each row by its weight, and add the rows back into
    their tokens."""
    top_k = expert_ids.shape[1]
    flat_ids = expert_ids.flatten()  # [T * k]: token t's j-th expert at t * k + j
    order = flat_ids.argsort(stable=True)  # pairs grouped by expert
    token_of = order // top_k  # [T * k]: the token of each sorted pair
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    x = hidden.index_select(0, token_of)  # [T * k, H]
    out = torch.empty_like(x)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            rows = slice(start, start + count)
            b13 = None if w13_bias is None else w13_bias[expert]
            b2 = None if w2_bias is None else w2_bias[expert]
            out[rows] = F.linear(activation(F.linear(x[rows], w13[expert], b13)), w2[expert], b2)
            start += count
    out.mul_(weights.flatten()[order].unsqueeze(1).to(out.dtype))
    return torch.zeros_like(hidden).index_add_(0, token_of, out)


class SparseMoE(nn.Module):
    """One layer's router and experts (this rank's intermediate rows of each expert)."""

    def __init__(self, arch: ModelArch, dtype: torch.dtype, device: torch.device | str, shard: TPShard):
        super().__init__()
        self.num_experts, self.top_k = arch.num_experts, arch.num_experts_per_tok
        self.renormalize = arch.norm_topk_prob
        self.activation = expert_activation(arch)
        self.intermediate_size = arch.moe_intermediate_size // shard.size  # per expert, on this rank
        self.reduce = shard.size > 1
        self.stacked_checkpoint = arch.architecture not in _CHECKPOINT_NAMES  # gpt-oss
        self.module, *self._projections = _CHECKPOINT_NAMES.get(arch.architecture, ("mlp",))
        h, e, i = arch.hidden_size, arch.num_experts, self.intermediate_size
        self.gate_weight = empty_parameter((e, h), dtype, device)
        self.w13 = empty_parameter((e, 2 * i, h), dtype, device)
        self.w2 = empty_parameter((e, h, i), dtype, device)
        bias = arch.moe_bias
        self.gate_bias = empty_parameter((e,), dtype, device) if bias else None
        self.w13_bias = empty_parameter((e, 2 * i), dtype, device) if bias else None
        self.w2_bias = empty_parameter((e, h), dtype, device) if bias else None
        self.adds_down_bias = bias and shard.rank == 0  # the other ranks' partial sums leave it out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden] (normed) -> [T, hidden], summed over the tensor-parallel ranks."""
        router_logits = F.linear(x, self.gate_weight, self.gate_bias)  # [T, E]
        out = moe_forward(x, router_logits, self.w13, self.w2, self.top_k, self.renormalize, self.activation,
                          self.w13_bias, self.w2_bias if self.adds_down_bias else None)
        return all_reduce(out) if self.reduce else out

    def weight_slot(self, name: str) -> WeightSlot | None:
        """Checkpoint name inside the layer (`mlp.experts.3.up_proj.weight`) -> where it goes."""
        prefix = self.module + "."
        if not name.startswith(prefix):
            return None
        rest = name[len(prefix):]
        if self.stacked_checkpoint:
            return self._stacked_slots().get(rest)
        if rest == "gate.weight":
            return WeightSlot(self.gate_weight)
        parts = rest.split(".")  # experts, E, projection, weight
        if len(parts) != 4 or parts[0] != "experts" or parts[3] != "weight" or not parts[1].isdigit() \
                or int(parts[1]) >= self.num_experts:
            return None
        expert, inter = int(parts[1]), self.intermediate_size
        gate, up, down = self._projections
        return {gate: WeightSlot(self.w13[expert, :inter], 0), up: WeightSlot(self.w13[expert, inter:], 0),
                down: WeightSlot(self.w2[expert], 1)}.get(parts[2])

    def _stacked_slots(self) -> dict[str, WeightSlot]:
        """gpt-oss: every expert of the layer in one tensor per projection, [E, in, out] (transposed)."""
        return {"router.weight": WeightSlot(self.gate_weight), "router.bias": WeightSlot(self.gate_bias),
                "experts.gate_up_proj": WeightSlot(self.w13.transpose(1, 2), 2),  # [E, H, 2I]
                "experts.gate_up_proj_bias": WeightSlot(self.w13_bias, 1),
                "experts.down_proj": WeightSlot(self.w2.transpose(1, 2), 1),  # [E, I, H]
                "experts.down_proj_bias": WeightSlot(self.w2_bias)}

    def weight_names(self) -> list[str]:
        if self.stacked_checkpoint:
            return [f"{self.module}.{name}" for name in self._stacked_slots()]
        names = [f"{self.module}.gate.weight"]
        for expert in range(self.num_experts):
            names += [f"{self.module}.experts.{expert}.{p}.weight" for p in self._projections]
        return names
