"""What the Triton backends share: is Triton usable here, may it run on these tensors, launch helpers.

Nothing here imports Triton. The modules holding the ``@triton.jit`` kernels are imported on first
use, because Triton decides when a kernel is decorated (and when ``triton`` itself is first imported)
whether it compiles for the GPU or runs through its CPU interpreter (``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from typing import List, Optional

import torch

from ..attention.backends.base import AttentionCall

INTERPRET_ENV = "TRITON_INTERPRET"
# Head dims above this would need smaller blocks than the kernels' launch configurations provide.
MAX_HEAD_DIM = 256
# CUDA allows at most this many programs along a grid's y (and z) axis; the kernels put batch * heads there.
MAX_GRID_Y = 65535


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] set to None to hide it
        return False


def interpreter_requested() -> bool:
    """True when TRITON_INTERPRET asks Triton to run kernels on CPU tensors (read on every call)."""
    return os.environ.get(INTERPRET_ENV, "").strip().lower() in ("1", "true", "on", "yes", "y")


def triton_unavailable_reason() -> Optional[str]:
    """Why no Triton kernel can run in this process (None when one can)."""
    if not triton_installed():
        return "triton is not installed"
    if not interpreter_requested() and not torch.cuda.is_available():
        return f"needs a CUDA device (set {INTERPRET_ENV}=1 to run on CPU tensors)"
    return None


def interpreted_reason() -> Optional[str]:
    """Why the kernels run here only as a correctness check (TRITON_INTERPRET on CPU), else None."""
    if interpreter_requested() and not torch.cuda.is_available():
        return f"runs through Triton's CPU interpreter ({INTERPRET_ENV}=1): a correctness check, not a speed"
    return None


def _triton_imported_compiled() -> bool:
    """True when ``triton`` was already imported without TRITON_INTERPRET, so its own library compiles for GPUs."""
    standard = sys.modules.get("triton.language.standard")
    library_function = getattr(standard, "cdiv", None)
    return library_function is not None and type(library_function).__name__ != "InterpretedFunction"


def device_reasons(call_device: torch.device) -> List[str]:
    """Why the kernels cannot run on CPU tensors (empty for CUDA; Backend itself refuses other devices)."""
    if call_device.type != "cpu":
        return []
    if not interpreter_requested():
        return [f"CPU tensors run only through Triton's interpreter: set {INTERPRET_ENV}=1 before triton is "
                "first imported"]
    if _triton_imported_compiled():
        return [f"triton was imported before {INTERPRET_ENV}=1 was set, so it compiles for GPUs; set it before "
                "the first `import triton`"]
    return []


def call_reasons(call: AttentionCall) -> List[str]:
    """Why a Triton backend cannot serve ``call``, beyond what Backend checks (availability, device kind, dtype)."""
    device, dim, dim_v = call.device, call.q.shape[-1], call.v.shape[-1]
    reasons = []
    if triton_unavailable_reason() is None:  # else Backend already reports "not available: ..."
        reasons += device_reasons(device)
        if call.dtype == torch.bfloat16 and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
            reasons.append("bfloat16 needs a GPU of compute capability 8.0 or newer")
    if call.q.shape[1] > MAX_GRID_Y:
        reasons.append(f"more than {MAX_GRID_Y} heads in one call are not supported (got {call.q.shape[1]})")
    if max(dim, dim_v) > MAX_HEAD_DIM:
        reasons.append(f"head dims above {MAX_HEAD_DIM} are not supported (got D={dim}, Dv={dim_v})")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (call.q, call.k, call.v)):
        reasons.append("the kernels have no backward pass, and q, k or v requires grad")
    return reasons


def shared_memory_per_program(device: torch.device) -> int:
    """Bytes of shared memory one kernel program may use on the CUDA ``device``."""
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block))


def batch_parts(batch: int, heads: int) -> List[slice]:
    """Slices of the batch, each with at most MAX_GRID_Y batch * heads programs, for grids that put batch * heads
    on the y axis (e.g. 2 * 4096 * 8 for temporal attention over every latent pixel would exceed it)."""
    step = max(1, MAX_GRID_Y // max(1, heads))
    return [slice(start, min(start + step, batch)) for start in range(0, batch, step)]


def batch_part(tensor: torch.Tensor, part: slice) -> torch.Tensor:
    """``tensor[part]`` for a per-batch tensor; a (1, ...) tensor shared by the whole batch stays as it is."""
    return tensor[part] if tensor.shape[0] > 1 else tensor


def load_kernels(module_name: str):
    """Import the module holding ``@triton.jit`` kernels (``kernels.<module_name>``) on first use."""
    return importlib.import_module(f"{__package__}.{module_name}")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def padded_dim(dim: int) -> int:
    """Next power of two >= dim, at least 16 (the smallest tl.dot operand size)."""
    return max(16, 1 << (dim - 1).bit_length())


def runs_interpreted(kernel) -> bool:
    """True when ``kernel`` (a ``@triton.jit`` function) was decorated under TRITON_INTERPRET=1."""
    return type(kernel).__name__ == "InterpretedFunction"


def dot_precision(dtype: torch.dtype, interpreted: bool) -> Optional[str]:
    """tl.dot input precision for operands of ``dtype``: fp32 stays fp32-accurate (3xTF32 tensor-core passes
    on NVIDIA GPUs, plain fp32 on AMD ones); None (Triton's default) for fp16 / bf16."""
    if dtype != torch.float32:
        return None
    return "ieee" if interpreted or torch.version.hip else "tf32x3"
