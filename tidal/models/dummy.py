"""Dummy weights for benchmarks and tests (`dummy:PRESET`), like vLLM's `--load-format dummy`.

Weights are drawn uniform in [-scale, scale] by one seeded generator on the model's own device,
in place and in the model's dtype, so an 8B model starts in seconds on a GPU. Norm weights are 1,
so activations stay in a sane range. FP8 linears (`ModelArch.quantization`) are drawn straight
into e4m3 in chunks (`Fp8Linear.fill_dummy`): no float copy of a 70B model is ever made. A tensor-parallel rank fills only its own shard, from a
generator seeded by the seed and its rank (values don't matter here, so the shards are not
slices of the unsharded model's weights).
"""

from __future__ import annotations

import torch

from tidal.models.fp8 import Fp8Linear

DUMMY_WEIGHT_SCALE = 0.02
RANK_SEED_STRIDE = 1_000_003


@torch.no_grad()
def init_dummy_weights(model, seed: int = 0) -> None:
    generator = torch.Generator(device=model.device).manual_seed(seed + RANK_SEED_STRIDE * model.shard.rank)
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            module.fill_dummy(DUMMY_WEIGHT_SCALE, generator)
    for name, param in model.named_parameters():
        if param.dtype == torch.float8_e4m3fn or name.endswith("weight_scale"):
            continue
        if name.endswith("layernorm") or name in ("norm",) or name.endswith("qk_norm"):
            param.fill_(1.0)
        else:
            param.uniform_(-DUMMY_WEIGHT_SCALE, DUMMY_WEIGHT_SCALE, generator=generator)
