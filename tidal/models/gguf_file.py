"""A fast, read-only view of a GGUF file: metadata as plain Python values, tensors as mmap slices.

`gguf.GGUFReader` builds a numpy view per array element, which takes seconds on a 50k-token
vocabulary; this parser reads the same header in ~0.1 s. Tensor data stays in the memory map
and is laid out exactly as `gguf.GGUFReader` lays it out, so `gguf.quants.dequantize` takes it.
No torch here: the tokenizer (frontend) reads GGUF metadata too.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
# ggml types stored unquantized: numpy dtype of the elements.
_PLAIN_TENSOR_TYPES = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64,
                       28: np.float64}


@dataclass
class GGUFTensor:
    name: str
    tensor_type: object
    """`gguf.GGMLQuantizationType` of the data."""
    shape: tuple[int, ...]
    """Logical shape, row-major (GGUF lists dims fastest first; this is reversed)."""
    data: np.ndarray
    """Read-only mmap slice: typed elements for plain types, raw bytes per row for quantized ones."""


class GGUFFile:
    """Parses the header on construction; `metadata` maps keys to ints, floats, strs or lists."""

    def __init__(self, path: str):
        self.path = path
        self._buffer = np.memmap(path, dtype=np.uint8, mode="r")
        self._view = memoryview(self._buffer)
        self._offset = 0
        if bytes(self._read(4)) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version, num_tensors, num_kvs = self._unpack("<IQQ")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        self.metadata = {}
        for _ in range(num_kvs):
            key = self._string()
            self.metadata[key] = self._value(self._unpack("<I")[0])
        infos = [self._tensor_info() for _ in range(num_tensors)]
        alignment = self.metadata.get("general.alignment", 32)
        data_start = -(-self._offset // alignment) * alignment
        self.tensors = [self._tensor(data_start, *info) for info in infos]

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def _read(self, size: int) -> memoryview:
        chunk = self._view[self._offset:self._offset + size]
        self._offset += size
        return chunk

    def _unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self._view, self._offset)
        self._offset += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (length,) = self._unpack("<Q")
        return str(self._read(length), "utf-8", errors="replace")

    def _value(self, value_type: int):
        if value_type == _STRING:
            return self._string()
        if value_type == _ARRAY:
            item_type, count = self._unpack("<IQ")
            if item_type == _STRING:
                return [self._string() for _ in range(count)]
            if item_type == _ARRAY:
                return [self._value(_ARRAY) for _ in range(count)]
            dtype = np.dtype(_NUMPY[item_type])
            items = np.frombuffer(self._read(count * dtype.itemsize), dtype=dtype)
            return items.tolist()
        return self._unpack(_SCALARS[value_type])[0]

    def _tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string()
        (num_dims,) = self._unpack("<I")
        dims = self._unpack(f"<{num_dims}Q")
        tensor_type, offset = self._unpack("<IQ")
        return name, tuple(reversed(dims)), tensor_type, offset

    def _tensor(self, data_start: int, name: str, shape: tuple[int, ...], type_id: int, offset: int) -> GGUFTensor:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        tensor_type = GGMLQuantizationType(type_id)
        start = data_start + offset
        if type_id in _PLAIN_TENSOR_TYPES:
            dtype = np.dtype(_PLAIN_TENSOR_TYPES[type_id])
            count = int(np.prod(shape))
            data = self._buffer[start:start + count * dtype.itemsize].view(dtype).reshape(shape)
        else:
            # Quantized rows: [*shape[:-1], bytes_per_row], as gguf.GGUFReader gives them.
            block_size, type_size = GGML_QUANT_SIZES[tensor_type]
            row_bytes = shape[-1] // block_size * type_size
            rows = int(np.prod(shape[:-1]))
            data = self._buffer[start:start + rows * row_bytes].reshape(*shape[:-1], row_bytes)
        return GGUFTensor(name, tensor_type, shape, data)
