"""`ModelArch`: the shape of a llama-family model (dense or mixture-of-experts), and named presets
for dummy weights.

A `ModelArch` is read once from a checkpoint (GGUF metadata, `config.json`) or taken from
`PRESETS`, and never changes afterwards. It imports no torch, so the frontend and the planner
can size things from it without loading the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "freq_factors", "yarn")
LAYER_TYPES = ("full_attention", "sliding_attention")
EXPERT_ACTIVATIONS = ("silu", "swiglu_clamped")


@dataclass(frozen=True)
class ModelArch:
    architecture: str
    """`llama`, `mistral`, `qwen2`, `qwen3`, or the MoE `qwen3_moe`, `mixtral` and `gpt_oss` (all run
    by `tidal.models.llama.LlamaModel`)."""
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    """HF-style rope scaling (`{"rope_type": "llama3", "factor": ..., ...}`, `linear`, `yarn`), None,
    or `{"rope_type": "freq_factors", "factors": (...)}`: a divisor per frequency, as GGUF files of
    Llama 3.1 store it."""
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    """The LM head reuses the token embedding matrix."""
    attention_bias: bool = False
    """q/k/v projections have a bias (Qwen2, gpt-oss)."""
    o_bias: bool = False
    """o_proj has a bias too (gpt-oss; Llama with `attention_bias`)."""
    qk_norm: bool = False
    """Per-head RMSNorm on q and k before RoPE (Qwen3)."""
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None
    """Attention window: a query sees itself and the `sliding_window - 1` keys before it. Applied in
    the layers `layer_types` names `sliding_attention`; without `layer_types` (old Mistral) no
    layer applies it and the loader caps `max_model_len` at it, where full and windowed attention agree."""
    layer_types: tuple[str, ...] = ()
    """Per layer, `full_attention` or `sliding_attention` (gpt-oss alternates them, sliding first);
    empty: every layer attends fully."""
    attention_sinks: bool = False
    """Each query head has a learned logit that joins its softmax's denominator, a "no token" the
    head may attend to (gpt-oss)."""
    num_experts: int = 0
    """Routed experts in each sparse layer; 0: a dense model (every layer a SiLU-gated MLP)."""
    num_experts_per_tok: int = 0
    """Experts each token goes to (top-k of the router's softmax)."""
    moe_intermediate_size: int = 0
    """Intermediate size of one expert (`intermediate_size` is the dense layers' MLP)."""
    norm_topk_prob: bool = True
    """Renormalize the top-k routing weights to sum to 1 (Mixtral always; Qwen3-MoE per config). The
    same as a softmax over the top-k logits alone, gpt-oss's formulation."""
    dense_layers: tuple[int, ...] = ()
    """Layers of an MoE model that keep a dense MLP (Qwen3-MoE's `mlp_only_layers` and
    `decoder_sparse_step`); every other layer is sparse."""
    moe_bias: bool = False
    """The router and every expert's gate_up and down projections have biases (gpt-oss)."""
    expert_activation: str = "silu"
    """`silu`: silu(gate) * up; `swiglu_clamped`: gpt-oss's clamped SwiGLU
    (`tidal.models.layers.clamped_swiglu`, with `swiglu_alpha` and `swiglu_limit`)."""
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        rope_type = rope_type_of(self.rope_scaling)
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope scaling type {rope_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        if rope_type == "yarn" and not self.rope_scaling.get("original_max_position_embeddings"):
            raise ValueError("yarn rope scaling needs original_max_position_embeddings")
        if self.num_experts and not (0 < self.num_experts_per_tok <= self.num_experts
                                     and self.moe_intermediate_size > 0):
            raise ValueError(f"an MoE model needs 0 < num_experts_per_tok ({self.num_experts_per_tok}) <= "
                             f"num_experts ({self.num_experts}) and moe_intermediate_size > 0 "
                             f"({self.moe_intermediate_size})")
        self._check_attention_layers()
        if self.expert_activation not in EXPERT_ACTIVATIONS:
            raise ValueError(f"expert activation {self.expert_activation!r} is not supported "
                             f"(supported: {', '.join(EXPERT_ACTIVATIONS)})")

    def _check_attention_layers(self) -> None:
        if not self.layer_types:
            return
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types names {len(self.layer_types)} layers; the model has {self.num_layers}")
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"layer types {unknown} are not supported (supported: {', '.join(LAYER_TYPES)})")
        if "sliding_attention" in self.layer_types and not (self.sliding_window and self.sliding_window > 0):
            raise ValueError("sliding_attention layers need a sliding_window > 0")

    def attention_window(self, index: int) -> int | None:
        """The window layer `index` attends within (None: the whole context)."""
        if self.layer_types and self.layer_types[index] == "sliding_attention":
            return self.sliding_window
        return None

    @property
    def has_windowed_layers(self) -> bool:
        """Some layer applies `sliding_window` itself (so `max_model_len` need not stop at it)."""
        return "sliding_attention" in self.layer_types

    def is_sparse_layer(self, index: int) -> bool:
        """Layer `index` has routed experts instead of a dense MLP."""
        return self.num_experts > 0 and index not in self.dense_layers

    @property
    def num_sparse_layers(self) -> int:
        return sum(self.is_sparse_layer(i) for i in range(self.num_layers))

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def replace(self, **changes) -> ModelArch:
        return dataclasses.replace(self, **changes)


def check_tensor_parallel(arch: ModelArch, tp_size: int) -> None:
    """Raise a clear error when `arch` can't be split over `tp_size` ranks (heads, and the MLP or
    experts' intermediate rows, whichever the model has)."""
    sizes = {"num_heads": arch.num_heads, "num_kv_heads": arch.num_kv_heads}
    if arch.num_sparse_layers < arch.num_layers:
        sizes["intermediate_size"] = arch.intermediate_size
    if arch.num_experts:
        sizes["moe_intermediate_size"] = arch.moe_intermediate_size
    for what, count in sizes.items():
        if count % tp_size:
            listed = ", ".join(f"{name} ({value})" for name, value in sizes.items())
            raise ValueError(f"tensor_parallel_size {tp_size} does not divide this model's {what} ({count}); "
                             f"use a tensor_parallel_size that divides {listed}")


def rope_type_of(rope_scaling: dict | None) -> str:
    if not rope_scaling:
        return "default"
    return rope_scaling.get("rope_type", rope_scaling.get("type", "default"))


def param_count(arch: ModelArch) -> int:
    """Number of weights, every expert included, computed from the shapes alone (nothing allocated)."""
    return _count_params(arch, arch.num_experts)


def active_param_count(arch: ModelArch) -> int:
    """Weights one token's forward uses: `param_count` with only `num_experts_per_tok` experts per
    sparse layer (the router still counts whole). Equal to `param_count` for a dense model."""
    return _count_params(arch, arch.num_experts_per_tok)


def _count_params(arch: ModelArch, experts: int) -> int:
    h, d = arch.hidden_size, arch.head_dim
    attention = h * (arch.q_size + 2 * arch.kv_size) + arch.q_size * h
    if arch.attention_bias:
        attention += arch.q_size + 2 * arch.kv_size
    attention += h * arch.o_bias + arch.num_heads * arch.attention_sinks
    if arch.qk_norm:
        attention += 2 * d
    norms = 2 * h
    sparse = arch.num_sparse_layers
    dense_mlp = 3 * h * arch.intermediate_size
    inter = arch.moe_intermediate_size
    expert = 3 * h * inter + (2 * inter + h) * arch.moe_bias
    sparse_mlp = experts * expert + arch.num_experts * (h + arch.moe_bias)  # experts + router
    layers = (arch.num_layers * (attention + norms) + (arch.num_layers - sparse) * dense_mlp
              + sparse * sparse_mlp)
    embeddings = arch.vocab_size * h * (1 if arch.tie_word_embeddings else 2)
    return layers + embeddings + h


_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_GPT_OSS_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                 "original_max_position_embeddings": 4096, "truncate": False}


def alternating_layer_types(num_layers: int) -> tuple[str, ...]:
    """gpt-oss's layout (and transformers' default for it): sliding, full, sliding, full, ..."""
    return tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers))


def _gpt_oss(num_layers: int, num_experts: int) -> ModelArch:
    """openai/gpt-oss-20b and -120b differ only in depth and expert count."""
    return ModelArch(
        "gpt_oss", hidden_size=2880, num_layers=num_layers, num_heads=64, num_kv_heads=8, head_dim=64,
        intermediate_size=2880, vocab_size=201088, rope_theta=150000.0, rope_scaling=_GPT_OSS_ROPE,
        rms_norm_eps=1e-5, attention_bias=True, o_bias=True, max_position_embeddings=131072,
        bos_token_id=199998, eos_token_ids=(200002, 199999, 200012), sliding_window=128,
        layer_types=alternating_layer_types(num_layers), attention_sinks=True, num_experts=num_experts,
        num_experts_per_tok=4, moe_intermediate_size=2880, moe_bias=True, expert_activation="swiglu_clamped")

# Shapes from each model's public config.json (instruct variants for the token ids).
PRESETS: dict[str, ModelArch] = {
    "llama-3.1-8b": ModelArch(
        "llama", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
        intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE,
        rms_norm_eps=1e-5, max_position_embeddings=131072, bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009)),
    "llama-3.1-70b": ModelArch(
        "llama", hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
        intermediate_size=28672, vocab_size=128256, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE,
        rms_norm_eps=1e-5, max_position_embeddings=131072, bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009)),
    "qwen3-8b": ModelArch(
        "qwen3", hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
        intermediate_size=12288, vocab_size=151936, rope_theta=1000000.0, rms_norm_eps=1e-6,
        qk_norm=True, max_position_embeddings=40960, bos_token_id=151643, eos_token_ids=(151645, 151643)),
    "qwen2.5-7b": ModelArch(
        "qwen2", hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
        intermediate_size=18944, vocab_size=152064, rope_theta=1000000.0, rms_norm_eps=1e-6,
        attention_bias=True, max_position_embeddings=32768, bos_token_id=151643,
        eos_token_ids=(151645, 151643)),
    "mistral-7b": ModelArch(  # Mistral-7B-Instruct-v0.3
        "mistral", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
        intermediate_size=14336, vocab_size=32768, rope_theta=1000000.0, rms_norm_eps=1e-5,
        max_position_embeddings=32768, bos_token_id=1, eos_token_ids=(2,)),
    "smollm2-135m": ModelArch(
        "llama", hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
        intermediate_size=1536, vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, max_position_embeddings=8192, bos_token_id=1, eos_token_ids=(2,)),
    # Small random-weight models for GPU tests: shapes the Triton kernels are tuned for (head dims
    # 64 and 128, GQA 4), small enough to compare against a float32 CPU run.
    "small-llama": ModelArch(
        "llama", hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64,
        intermediate_size=1536, vocab_size=49152, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, max_position_embeddings=4096, bos_token_id=1, eos_token_ids=(2,)),
    "small-qwen3": ModelArch(
        "qwen3", hidden_size=1024, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=128,
        intermediate_size=2048, vocab_size=49152, rope_theta=1000000.0, rms_norm_eps=1e-6,
        qk_norm=True, max_position_embeddings=4096, bos_token_id=1, eos_token_ids=(2,)),
    # Mixture-of-experts models (full shapes; `active_param_count` gives the per-token part).
    "qwen3-30b-a3b": ModelArch(
        "qwen3_moe", hidden_size=2048, num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128,
        intermediate_size=6144, vocab_size=151936, rope_theta=1000000.0, rms_norm_eps=1e-6, qk_norm=True,
        max_position_embeddings=40960, bos_token_id=151643, eos_token_ids=(151645, 151643),
        num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True),
    "mixtral-8x7b": ModelArch(  # Mixtral-8x7B-Instruct-v0.1
        "mixtral", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
        intermediate_size=14336, vocab_size=32000, rope_theta=1000000.0, rms_norm_eps=1e-5,
        max_position_embeddings=32768, bos_token_id=1, eos_token_ids=(2,),
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=14336),
    # gpt-oss (bf16 shapes; the hub's checkpoints store the experts in MXFP4). Token ids: <|startoftext|>;
    # <|return|>, <|endoftext|>, <|call|>.
    "gpt-oss-20b": _gpt_oss(num_layers=24, num_experts=32),
    "gpt-oss-120b": _gpt_oss(num_layers=36, num_experts=128),
    # A small MoE for GPU tests: Qwen3-MoE's proportions (narrow experts, top-8) at head_dim 128.
    "small-qwen3-moe": ModelArch(
        "qwen3_moe", hidden_size=1024, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=128,
        intermediate_size=2048, vocab_size=49152, rope_theta=1000000.0, rms_norm_eps=1e-6,
        qk_norm=True, max_position_embeddings=4096, bos_token_id=1, eos_token_ids=(2,),
        num_experts=64, num_experts_per_tok=8, moe_intermediate_size=384),
    # Tiny test models. Their vocabulary is the embedded SmolLM2 tokenizer's, so a server started
    # on `dummy:tiny-*` can take any prompt that tokenizer produces.
    "tiny-llama": ModelArch(
        "llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=128, vocab_size=49152, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, max_position_embeddings=2048, bos_token_id=1, eos_token_ids=(2,)),
    "tiny-qwen3": ModelArch(
        "qwen3", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
        intermediate_size=128, vocab_size=49152, rope_theta=1000000.0, rms_norm_eps=1e-6,
        qk_norm=True, max_position_embeddings=2048, bos_token_id=1, eos_token_ids=(2,)),
    "tiny-qwen3-moe": ModelArch(
        "qwen3_moe", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
        intermediate_size=128, vocab_size=49152, rope_theta=1000000.0, rms_norm_eps=1e-6,
        qk_norm=True, max_position_embeddings=2048, bos_token_id=1, eos_token_ids=(2,),
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32),
    "tiny-mixtral": ModelArch(
        "mixtral", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=64, vocab_size=49152, rope_theta=1000000.0, rms_norm_eps=1e-5,
        max_position_embeddings=2048, bos_token_id=1, eos_token_ids=(2,),
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64),
    # gpt-oss's features at a tiny size: a 16-token window in layers 0 and 2, sinks, YaRN, biases.
    "tiny-gpt-oss": _gpt_oss(num_layers=4, num_experts=4).replace(
        hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=64, vocab_size=49152,
        rope_scaling={**_GPT_OSS_ROPE, "factor": 4.0, "original_max_position_embeddings": 512},
        max_position_embeddings=2048, bos_token_id=1, eos_token_ids=(2,), sliding_window=16,
        num_experts_per_tok=2, moe_intermediate_size=64),
}


def get_preset(name: str) -> ModelArch:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown dummy model preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None


_HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                     "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                     "Qwen3MoeForCausalLM": "qwen3_moe", "MixtralForCausalLM": "mixtral",
                     "GptOssForCausalLM": "gpt_oss"}


def _eos_ids(*values) -> tuple[int, ...]:
    """Flatten eos ids given as int, list or None, keeping first-seen order."""
    ids: list[int] = []
    for value in values:
        for token_id in (value if isinstance(value, (list, tuple)) else [value]):
            if token_id is not None and token_id not in ids:
                ids.append(int(token_id))
    return tuple(ids)


def _hf_rope(config: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either the old keys or transformers 5's `rope_parameters`."""
    params = config.get("rope_parameters") or {}
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling and rope_type_of(scaling) == "default":
        scaling = None
    return float(theta), (dict(scaling) if scaling else None)


def _hf_moe(config: dict, architecture: str) -> dict:
    """The MoE fields of `ModelArch` from a Qwen3-MoE, Mixtral or gpt-oss config (none for a dense model).

    transformers 5 writes Qwen3-MoE's `num_experts` as `num_local_experts`; both are read. A
    Qwen3-MoE layer is sparse unless listed in `mlp_only_layers` or off the `decoder_sparse_step`
    grid, as transformers builds it."""
    if architecture == "gpt_oss":
        return _hf_gpt_oss(config)
    if architecture == "mixtral":
        return {"num_experts": config.get("num_local_experts", 8),
                "num_experts_per_tok": config.get("num_experts_per_tok", 2),
                "moe_intermediate_size": config["intermediate_size"], "norm_topk_prob": True}
    if architecture != "qwen3_moe":
        return {}
    num_experts = config.get("num_experts", config.get("num_local_experts", 128))  # transformers' defaults
    step, only_dense = config.get("decoder_sparse_step", 1), set(config.get("mlp_only_layers") or ())
    dense = tuple(i for i in range(config["num_hidden_layers"])
                  if not num_experts or i in only_dense or (i + 1) % step)
    return {"num_experts": num_experts, "num_experts_per_tok": config.get("num_experts_per_tok", 8),
            "moe_intermediate_size": config.get("moe_intermediate_size", 768),
            "norm_topk_prob": bool(config.get("norm_topk_prob", False)), "dense_layers": dense}


def _hf_gpt_oss(config: dict) -> dict:
    """gpt-oss's MoE and attention fields (transformers' `GptOssConfig` defaults where a key is missing).

    Its `intermediate_size` is an expert's; `layer_types` defaults to sliding/full alternation."""
    layer_types = config.get("layer_types") or alternating_layer_types(config["num_hidden_layers"])
    return {"num_experts": config.get("num_local_experts", 128),
            "num_experts_per_tok": config.get("num_experts_per_tok", config.get("experts_per_token", 4)),
            "moe_intermediate_size": config["intermediate_size"], "norm_topk_prob": True, "moe_bias": True,
            "expert_activation": "swiglu_clamped", "swiglu_alpha": float(config.get("swiglu_alpha", 1.702)),
            "swiglu_limit": float(config.get("swiglu_limit", 7.0)), "layer_types": tuple(layer_types),
            "attention_sinks": True, "o_bias": bool(config.get("attention_bias", True))}


def arch_from_hf_config(config: dict, generation_config: dict | None = None) -> ModelArch:
    """A `ModelArch` from a Hugging Face `config.json` (and `generation_config.json`) dict."""
    names = config.get("architectures") or []
    known = [_HF_ARCHITECTURES[n] for n in names if n in _HF_ARCHITECTURES]
    if not known:
        raise ValueError(f"unsupported architecture {names!r}; supported: {', '.join(_HF_ARCHITECTURES)}")
    architecture = known[0]
    num_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // num_heads
    rope_theta, rope_scaling = _hf_rope(config)
    generation_config = generation_config or {}
    # Qwen configs switch the window on with `use_sliding_window` (off by default); Mistral's have no switch.
    windowed = config.get("use_sliding_window", not architecture.startswith("qwen"))
    sliding_window = config.get("sliding_window") if windowed else None
    extra = {"o_bias": architecture == "llama" and bool(config.get("attention_bias", False)),
             **_hf_moe(config, architecture)}
    return ModelArch(
        architecture=architecture,
        hidden_size=config["hidden_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=config.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        intermediate_size=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases; its config has no key for them. Llama's key covers o_proj too.
        attention_bias=architecture == "qwen2" or bool(config.get("attention_bias", architecture == "gpt_oss")),
        qk_norm=architecture in ("qwen3", "qwen3_moe"),
        max_position_embeddings=config.get("max_position_embeddings", 4096),
        bos_token_id=generation_config.get("bos_token_id", config.get("bos_token_id")),
        eos_token_ids=_eos_ids(generation_config.get("eos_token_id"), config.get("eos_token_id")),
        sliding_window=sliding_window if architecture in ("mistral", "mixtral", "qwen3_moe", "gpt_oss") else None,
        **extra,
    )
