"""KV transfer between workers: `create_kv_transfer` picks the backend (see `base.py`).

Backends are imported only when chosen, so a CPU worker never imports the CUDA one and a GPU
worker never starts ZMQ threads it does not use.
"""

from __future__ import annotations

import importlib

import torch

from tidal.protocol import KVLayout
from tidal.transfer.base import KVTransferBackend, KVTransferConfig, KVTransferError, Transfer

__all__ = ["KVTransferBackend", "KVTransferConfig", "KVTransferError", "Transfer", "create_kv_transfer"]

_BACKENDS = {  # name -> (module, class)
    "fake": ("tidal.transfer.fake", "FakeKVTransfer"),
    "shm": ("tidal.transfer.shm", "ShmKVTransfer"),
    "zmq": ("tidal.transfer.zmq_backend", "ZmqKVTransfer"),
    "cuda_ipc": ("tidal.transfer.cuda_ipc", "CudaIpcKVTransfer"),
}


def create_kv_transfer(layout: KVLayout, device: torch.device, worker_id: str,
                       config: KVTransferConfig) -> KVTransferBackend:
    """The backend `config.backend` names (`auto`: cuda_ipc for a CUDA device, shm otherwise),
    with the worker's KV cache allocated."""
    name = config.backend
    if name == "auto":
        name = "cuda_ipc" if torch.device(device).type == "cuda" else "shm"
    module_name, class_name = _BACKENDS[name]
    backend_cls = getattr(importlib.import_module(module_name), class_name)
    return backend_cls(layout, device, worker_id, config)
