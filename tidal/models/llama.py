"""The llama-family decoder: Llama 2/3, SmolLM2, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k norm), and
the mixture-of-experts Qwen3-MoE, Mixtral and gpt-oss (a sparse layer's MLP is
`tidal.models.moe.SparseMoE`). gpt-oss adds per-head attention sinks, an o_proj bias and a sliding
window in every other layer (`ModelArch.attention_window`), all passed to the attention kernels.

`LlamaModel` owns the weights (in the fused layout below) and a RoPE cos/sin table; it holds no
per-request state. The KV cache belongs to the caller (the model runner), which passes one
(k_cache, v_cache) pair per layer into every `forward`.

Fused weight layout per layer (`load_weight` writes checkpoint tensors into these slices):
  qkv_weight      [q_size + 2 * kv_size, hidden]        rows: q_proj, then k_proj, then v_proj
  qkv_bias        [q_size + 2 * kv_size]                only with `attention_bias` (Qwen2, gpt-oss)
  o_bias [hidden] (`o_bias`), sinks [num_heads] float32 (`attention_sinks`)
  qk_norm         [num_heads + num_kv_heads, head_dim]  q_norm repeated per head, then k_norm
  gate_up_weight  [2 * intermediate_size, hidden]       rows: gate_proj, then up_proj
  o_weight [hidden, q_size], down_weight [hidden, intermediate_size]
A sparse layer has no gate_up/down weights; its `moe` holds the router and stacked experts.

Tensor parallel (`tp_size > 1`, see `tidal.parallel.sharding`): the same layout over this rank's
heads and MLP rows (num_heads, num_kv_heads, intermediate_size and the sizes above divided by
`tp_size`), and this rank's rows of the vocabulary; `load_weight` takes a full checkpoint tensor
and writes only this rank's slice of it.

The token axis is flat: the tokens of every request in the step, concatenated, no batch dim.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tidal.kernels import fused
from tidal.kernels.attention import attend, store_kv
from tidal.kernels.paged_attention import AttentionMetadata, cache_shape
from tidal.models.arch import ModelArch, check_tensor_parallel
from tidal.models.layers import add_rms_norm, apply_rope, rms_norm, rope_cos_sin_cache, silu_and_mul
from tidal.models.moe import SparseMoE
from tidal.models.weight_slot import WeightSlot
from tidal.models.weight_slot import empty_parameter as _empty
from tidal.parallel.sharding import (TPShard, row_parallel_linear, shard_rows, vocab_parallel_embedding,
                                     vocab_parallel_logits, vocab_per_rank)

_VOCAB_WEIGHTS = ("model.embed_tokens.weight", "lm_head.weight")


class Rope(NamedTuple):
    cache: torch.Tensor  # [max_positions, 2, head_dim]: cos, sign-folded sin (see rope_cos_sin_cache)
    positions: torch.Tensor  # [T]
    cos_sin: torch.Tensor | None  # [T, 2, head_dim]: rows of `cache` (torch path only)


class DecoderLayer(nn.Module):
    """One transformer block: pre-norm attention then pre-norm SiLU-gated MLP (or, in a sparse layer
    of an MoE model, routed experts)."""

    def __init__(self, arch: ModelArch, dtype: torch.dtype, device: torch.device | str,
                 shard: TPShard = TPShard(), index: int = 0):
        super().__init__()
        self.arch = arch
        h = arch.hidden_size
        # This rank's heads and MLP rows (all of them without tensor parallelism).
        self.num_heads, self.num_kv_heads = arch.num_heads // shard.size, arch.num_kv_heads // shard.size
        self.intermediate_size = arch.intermediate_size // shard.size
        self.q_size, self.kv_size = self.num_heads * arch.head_dim, self.num_kv_heads * arch.head_dim
        # o_proj and down_proj: partial sums on each rank, all-reduced, when sharded.
        self.row_linear = F.linear if shard.size == 1 else row_parallel_linear
        self.scale = arch.head_dim ** -0.5
        self.input_layernorm = _empty((h,), dtype, device)
        self.qkv_weight = _empty((self.q_size + 2 * self.kv_size, h), dtype, device)
        self.qkv_bias = _empty((self.q_size + 2 * self.kv_size,), dtype, device) if arch.attention_bias else None
        self.qk_norm = _empty((self.num_heads + self.num_kv_heads, arch.head_dim), dtype, device) \
            if arch.qk_norm else None
        self.o_weight = _empty((h, self.q_size), dtype, device)
        self.o_bias = _empty((h,), dtype, device) if arch.o_bias else None
        # Sinks join a float32 softmax; kept in float32 (a bf16 checkpoint's values are exact in it).
        self.sinks = _empty((self.num_heads,), torch.float32, device) if arch.attention_sinks else None
        self.window = arch.attention_window(index)
        self.post_attention_layernorm = _empty((h,), dtype, device)
        self.moe = SparseMoE(arch, dtype, device, shard) if arch.is_sparse_layer(index) else None
        dense = self.moe is None
        self.gate_up_weight = _empty((2 * self.intermediate_size, h), dtype, device) if dense else None
        self.down_weight = _empty((h, self.intermediate_size), dtype, device) if dense else None

    def weight_slot(self, name: str) -> WeightSlot | None:
        """Hugging Face name inside the layer (`self_attn.q_proj.weight`) -> where it goes."""
        if self.moe is not None and name.partition(".")[0] in ("mlp", self.moe.module):
            return self.moe.weight_slot(name)
        q, kv, inter = self.q_size, self.kv_size, self.intermediate_size
        heads = self.num_heads
        qkv_rows = {"q_proj": slice(0, q), "k_proj": slice(q, q + kv), "v_proj": slice(q + kv, q + 2 * kv)}
        module, _, kind = name.rpartition(".")
        part = module.rpartition(".")[2]
        if part in qkv_rows:
            fused = self.qkv_weight if kind == "weight" else self.qkv_bias
            return None if fused is None else WeightSlot(fused[qkv_rows[part]], 0)
        if part in ("q_norm", "k_norm") and self.qk_norm is not None:
            return WeightSlot(self.qk_norm[:heads] if part == "q_norm" else self.qk_norm[heads:])
        if part in ("gate_proj", "up_proj"):
            return WeightSlot(self.gate_up_weight[:inter] if part == "gate_proj" else self.gate_up_weight[inter:], 0)
        slots = {"input_layernorm.weight": WeightSlot(self.input_layernorm),
                 "post_attention_layernorm.weight": WeightSlot(self.post_attention_layernorm),
                 "self_attn.o_proj.weight": WeightSlot(self.o_weight, 1),
                 "mlp.down_proj.weight": WeightSlot(self.down_weight, 1)}
        if self.o_bias is not None:  # added once, after the row-parallel sum
            slots["self_attn.o_proj.bias"] = WeightSlot(self.o_bias)
        if self.sinks is not None:
            slots["self_attn.sinks"] = WeightSlot(self.sinks, 0)  # this rank's heads
        return slots.get(name)

    def weight_names(self) -> list[str]:
        names = ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight"]
        names += self.moe.weight_names() if self.moe is not None else \
            ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
        names += [f"self_attn.{p}_proj.weight" for p in "qkv"]
        if self.arch.attention_bias:
            names += [f"self_attn.{p}_proj.bias" for p in "qkv"]
        if self.arch.o_bias:
            names.append("self_attn.o_proj.bias")
        if self.arch.attention_sinks:
            names.append("self_attn.sinks")
        if self.arch.qk_norm:
            names += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
        return names

    def attention(self, x: torch.Tensor, rope: Rope, kv_cache: tuple[torch.Tensor, torch.Tensor],
                  meta: AttentionMetadata) -> torch.Tensor:
        """x: [T, hidden] (normed) -> [T, hidden]."""
        arch = self.arch
        num_tokens = x.shape[0]
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias)  # [T, q_size + 2 * kv_size]
        k_cache, v_cache = kv_cache
        if meta.backend == "triton":  # one kernel: q/k norm, RoPE (q in place), k and v into the cache
            fused.rope_store_kv(qkv, rope.cache, rope.positions, self.qk_norm, arch.rms_norm_eps, self.num_heads,
                                self.num_kv_heads, k_cache, v_cache, meta.slot_mapping)
            q = qkv[:, :self.q_size].view(num_tokens, self.num_heads, arch.head_dim)
        else:
            # q and k are adjacent in qkv: normalize and rotate them together as heads [T, H + kvH, D].
            qk = qkv[:, :self.q_size + self.kv_size].view(num_tokens, self.num_heads + self.num_kv_heads,
                                                          arch.head_dim)
            if self.qk_norm is not None:
                qk = rms_norm(qk, self.qk_norm, arch.rms_norm_eps)
            qk = apply_rope(qk, rope.cos_sin)
            q = qk[:, :self.num_heads]  # [T, H, D]
            k = qk[:, self.num_heads:]  # [T, kvH, D]
            v = qkv[:, self.q_size + self.kv_size:].view(num_tokens, self.num_kv_heads, arch.head_dim)
            store_kv(k, v, k_cache, v_cache, meta)
        out = attend(q, k_cache, v_cache, meta, self.scale, self.window, self.sinks)  # [T, H, D]
        out = self.row_linear(out.reshape(num_tokens, self.q_size), self.o_weight)
        return out if self.o_bias is None else out.add_(self.o_bias)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.moe is not None:
            return self.moe(x)
        return self.row_linear(silu_and_mul(F.linear(x, self.gate_up_weight)), self.down_weight)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, rope: Rope,
                kv_cache: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, residual) -> (hidden, residual); the true stream is hidden + residual.

        The residual add is deferred into the next norm, so each norm is one add + one rms_norm.
        """
        eps = self.arch.rms_norm_eps
        if residual is None:
            residual = hidden
            hidden = rms_norm(hidden, self.input_layernorm, eps)
        else:
            hidden, residual = add_rms_norm(hidden, residual, self.input_layernorm, eps)
        hidden = self.attention(hidden, rope, kv_cache, meta)
        hidden, residual = add_rms_norm(hidden, residual, self.post_attention_layernorm, eps)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm, LM head (tied to the embedding or its own).

    Built as rank `tp_rank` of `tp_size` it holds that rank's shard and its forward runs the
    collectives of `tidal.parallel.sharding`, so every rank of the group must run the same forwards.
    """

    def __init__(self, arch: ModelArch, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 max_positions: int | None = None, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        check_tensor_parallel(arch, tp_size)
        self.arch = arch
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_positions = max_positions or arch.max_position_embeddings
        self.shard = TPShard(tp_rank, tp_size)
        self.vocab_rows = vocab_per_rank(arch.vocab_size, tp_size)  # rows of the vocabulary held here
        self.vocab_start = tp_rank * self.vocab_rows
        self.embed_tokens = _empty((self.vocab_rows, arch.hidden_size), dtype, device)
        self.layers = nn.ModuleList(DecoderLayer(arch, dtype, device, self.shard, index)
                                    for index in range(arch.num_layers))
        self.norm = _empty((arch.hidden_size,), dtype, device)
        self.lm_head = self.embed_tokens if arch.tie_word_embeddings \
            else _empty((self.vocab_rows, arch.hidden_size), dtype, device)
        cache = rope_cos_sin_cache(arch, self.max_positions, dtype, self.device)
        self.register_buffer("cos_sin_cache", cache, persistent=False)  # [P, 2, head_dim]
        self._loaded: set[str] = set()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], attn_metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] int64 -> final hidden states [T, hidden] (after the last norm)."""
        if self.shard.size == 1:
            hidden = F.embedding(input_ids, self.embed_tokens)  # [T, hidden]
        else:
            hidden = vocab_parallel_embedding(input_ids, self.embed_tokens, self.vocab_start)
        # The fused (Triton) path reads the table by position itself; the torch path gathers rows once.
        cos_sin = None if attn_metadata.backend == "triton" else self.cos_sin_cache.index_select(0, positions)
        rope = Rope(self.cos_sin_cache, positions, cos_sin)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(hidden, residual, rope, kv_cache, attn_metadata)
        hidden, _ = add_rms_norm(hidden, residual, self.norm, self.arch.rms_norm_eps)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32."""
        if self.shard.size == 1:
            return F.linear(hidden, self.lm_head).float()
        return vocab_parallel_logits(hidden, self.lm_head, self.arch.vocab_size).float().contiguous()

    # ---- weight loading: checkpoint tensors (Hugging Face names) into the fused layout ----

    def weight_slot(self, name: str) -> WeightSlot | None:
        """Where checkpoint tensor `name` goes (and how ranks split it)."""
        if name == "model.embed_tokens.weight":
            return WeightSlot(self.embed_tokens, 0)
        if name == "model.norm.weight":
            return WeightSlot(self.norm)
        if name == "lm_head.weight":
            # A tied model may still ship a copy of the embedding as lm_head: ignore it.
            return None if self.arch.tie_word_embeddings else WeightSlot(self.lm_head, 0)
        prefix = "model.layers."
        if not name.startswith(prefix):
            return None
        index, _, rest = name[len(prefix):].partition(".")
        if not index.isdigit() or int(index) >= len(self.layers):
            return None
        return self.layers[int(index)].weight_slot(rest)

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        """Copy one checkpoint tensor (this rank's slice of it) into place, cast to the model dtype and device."""
        slot = self.weight_slot(name)
        if slot is None:
            return
        target = slot.target
        if slot.split_dim is not None and self.shard.size > 1:
            tensor, target = self._rank_slice(name, tensor, slot)
        if target.dim() == tensor.dim() and target.shape != tensor.shape:
            raise ValueError(f"weight {name}: checkpoint shape {tuple(tensor.shape)}, "
                             f"model expects {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor)  # q/k norms ([head_dim]) broadcast over their heads
        self._loaded.add(name)

    def _rank_slice(self, name: str, tensor: torch.Tensor, slot: WeightSlot) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's slice of the full `tensor`, the part of the slot it fills). The last rank of
        a padded vocabulary fills fewer rows; its padding rows are zeroed."""
        dim, target = slot.split_dim, slot.target
        rows = target.shape[dim]
        full = self.arch.vocab_size if name in _VOCAB_WEIGHTS else rows * self.shard.size
        if tensor.dim() != target.dim() or tensor.shape[dim] != full:
            raise ValueError(f"weight {name}: checkpoint shape {tuple(tensor.shape)}, model expects "
                             f"{full} along dim {dim} (split over {self.shard.size} ranks)")
        part = shard_rows(tensor, dim, self.shard, rows)
        filled = part.shape[dim]
        if filled < rows:
            with torch.no_grad():
                target.narrow(dim, filled, rows - filled).zero_()
            target = target.narrow(dim, 0, filled)
        return part, target

    def expected_weight_names(self) -> list[str]:
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if not self.arch.tie_word_embeddings:
            names.append("lm_head.weight")
        for index, layer in enumerate(self.layers):
            names += [f"model.layers.{index}.{rest}" for rest in layer.weight_names()]
        return names

    def check_loaded(self) -> None:
        """Raise if the checkpoint left any weight unwritten."""
        missing = [n for n in self.expected_weight_names() if n not in self._loaded]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(f"checkpoint is missing {len(missing)} weights: {shown}")
        self._loaded.clear()


def kv_cache_shape(arch: ModelArch, num_blocks: int, block_size: int, tp_size: int = 1) -> tuple[int, int, int, int]:
    """Shape of one layer's k (or v) cache on one rank (the attention kernels' layout)."""
    return cache_shape(num_blocks, block_size, arch.num_kv_heads // tp_size, arch.head_dim)


def kv_bytes_per_token(arch: ModelArch, dtype: torch.dtype, tp_size: int = 1) -> int:
    """Bytes of K and V, all layers, for one token on one rank (of `tp_size`)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * arch.num_layers * (arch.num_kv_heads // tp_size) * arch.head_dim * itemsize
