"""Fixes for two bugs of the Triton 3.6 interpreter (TRITON_INTERPRET=1), for CPU test and smoke runs.

1. With numpy >= 2.4 a loop bound computed from a loaded value (`range(start, end, ...)`) raises
   "only 0-dimensional arrays can be converted to Python scalars": the interpreter keeps scalars
   as 1-element arrays and numpy 2.4 no longer converts those to int (triton-lang/triton#9171).
2. `tl.dot` of bfloat16 operands multiplies their raw uint16 bit patterns (the interpreter stores
   bfloat16 as uint16 and converts only 8-bit floats before `np.matmul`; triton-lang/triton#11584).
   Here bfloat16 operands are widened to float32 first (exact), which is what the tensor cores
   compute: bf16 products accumulated in fp32.

Compiled kernels on a GPU are untouched: this patches the interpreter's Python objects.
"""

from __future__ import annotations

import numpy as np
import triton.language as tl
from triton.runtime import interpreter

_applied = False


def _bf16_to_f32(handle: interpreter.TensorHandle) -> interpreter.TensorHandle:
    if handle.dtype.scalar != tl.bfloat16:
        return handle
    bits = handle.data.astype(np.uint32) << np.uint32(16)
    return interpreter.TensorHandle(bits.view(np.float32), tl.float32)


def apply() -> None:
    """Idempotent; a patch whose target a later triton renamed is skipped."""
    global _applied
    if _applied:
        return
    _applied = True
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is not None:
        def patch_tensor_index(tensor, scope):
            patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        interpreter._patch_lang_tensor = patch_tensor_index
    create_dot = getattr(interpreter.InterpreterBuilder, "create_dot", None)
    if create_dot is not None:
        def create_dot_bf16(self, a, b, d, *args, **kwargs):
            return create_dot(self, _bf16_to_f32(a), _bf16_to_f32(b), d, *args, **kwargs)

        interpreter.InterpreterBuilder.create_dot = create_dot_bf16
