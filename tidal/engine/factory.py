"""Building a real engine: the model, its tokenizer's stop ids, the KV transfer backend, the TP group.

`build_engine(config)` is the one place that loads things for an engine; `EngineCore` itself only
takes the parts. Order matters:
1. the current CUDA device (a single-device engine on cuda:N: Triton launches on the current
   device) or, with `tensor_parallel_size > 1`, the `TensorParallelGroup`, which spawns the other
   ranks so that every rank loads its shard at the same time;
2. this rank's shard of the model, the tokenizer (for its eos ids only), the KV layout, and the
   transfer backend, which allocates the KV cache where peers can reach it;
3. the TP group's `connect()` (every follower holds its shard), then the `ModelRunner` (every
   rank builds one from the same config, so they capture the same CUDA graphs);
4. the `EngineCore` around them.
A failure on the way closes what was started (the TP group's processes, the transfer backend).
"""

from __future__ import annotations

import logging
import time

import torch

from tidal.config import EngineConfig
from tidal.engine.engine import EngineCore, ServedModel
from tidal.engine.model_runner import ModelRunner, kv_layout
from tidal.engine.structured_output import StructuredOutputs
from tidal.engine.tensor_parallel import TensorParallelGroup
from tidal.models.loader import LoadedModel, load_model
from tidal.tokenizer import Tokenizer, load_tokenizer
from tidal.transfer import KVTransferBackend, KVTransferConfig, create_kv_transfer

logger = logging.getLogger(__name__)


def build_engine(config: EngineConfig, *, worker_id: str = "engine", transfer_config: KVTransferConfig | None = None,
                 record_kv_events: bool = False, tokenizer: Tokenizer | None = None) -> EngineCore:
    """An engine for `config`, its model loaded. `transfer_config`: disaggregation's KV transfer
    backend (None: aggregated only); `tokenizer`: the caller's, when it has loaded it (None: loaded
    here, by `load_engine_tokenizer`); the caller closes the engine."""
    started = time.monotonic()
    tp_size = config.parallel.tensor_parallel_size
    device = torch.device(config.model.device)
    if device.type == "cuda" and device.index is not None and tp_size == 1:
        # Triton launches on the current device: a worker on cuda:1 whose current device stayed
        # cuda:0 fails its first kernel ("cannot be accessed from Triton").
        torch.cuda.set_device(device)
    tp_group = TensorParallelGroup(config, with_kv_transfer=transfer_config is not None) if tp_size > 1 else None
    transfer = None
    try:
        loaded = load_model(config.model, tp_size=tp_size)
        tokenizer = tokenizer if tokenizer is not None else load_engine_tokenizer(config)
        layout = kv_layout(config, loaded)
        if transfer_config is not None:
            transfer = create_kv_transfer(layout, torch.device(loaded.device), worker_id, transfer_config)
        if tp_group is not None:
            tp_group.connect()
        structured = StructuredOutputs(tokenizer, torch.device(loaded.device)) if tokenizer is not None else None
        runner = ModelRunner(config, loaded, layout, transfer.cache if transfer else None,
                             on_step=tp_group.broadcast if tp_group is not None else None, structured=structured)
    except BaseException:
        _close(transfer, tp_group)
        raise
    if (config.model.model or "").startswith("dummy:") and tokenizer is not None \
            and tokenizer.vocab_size < loaded.arch.vocab_size:
        # Random weights pick every id alike, and ids past the tokenizer decode to no text, so a
        # client would see tokens arrive in clumps: a dummy model samples inside its tokenizer.
        runner.sample_vocab_size = tokenizer.vocab_size
    model = served_model(config, loaded, runner.num_blocks, tokenizer)
    engine = EngineCore(config, runner, model, transfer=transfer, tp_group=tp_group, worker_id=worker_id,
                        record_kv_events=record_kv_events, structured=structured)
    logger.info("engine ready: model=%s dtype=%s device=%s kv_blocks=%d block_size=%d "
                "max_model_len=%d token_budget=%d (%.1fs)", model.name, loaded.dtype, loaded.device,
                runner.num_blocks, layout.block_size, model.max_model_len, config.scheduler.token_budget,
                time.monotonic() - started)
    return engine


def load_engine_tokenizer(config: EngineConfig) -> Tokenizer | None:
    """The model's tokenizer. Dummy models borrow the embedded one; where that package is absent
    (a bare GPU box), they run on token ids alone (None)."""
    try:
        return load_tokenizer(config.model.model, config.model.tokenizer)
    except ValueError:
        if not (config.model.model or "").startswith("dummy:") or config.model.tokenizer:
            raise
        logger.warning("no tokenizer for %s: token ids only", config.model.model)
        return None


def served_model(config: EngineConfig, loaded: LoadedModel, num_kv_blocks: int,
                 tokenizer: Tokenizer | None) -> ServedModel:
    """What the engine serves: the model's name, vocabulary, context (capped by the KV cache) and
    eos ids (the tokenizer's and the model's)."""
    block_size = config.cache.block_size
    max_model_len = min(loaded.max_model_len, config.model.max_model_len or loaded.max_model_len,
                        num_kv_blocks * block_size)
    tokenizer_eos = tokenizer.eos_token_ids if tokenizer is not None else ()
    return ServedModel(name=config.model.served_model_name or loaded.name, vocab_size=loaded.arch.vocab_size,
                       max_model_len=max_model_len,
                       eos_token_ids=frozenset(tokenizer_eos) | frozenset(loaded.arch.eos_token_ids or ()))


def _close(transfer: KVTransferBackend | None, tp_group: TensorParallelGroup | None) -> None:
    if transfer is not None:
        transfer.close()
    if tp_group is not None:
        tp_group.close()
