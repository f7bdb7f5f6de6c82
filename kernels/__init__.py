"""Optional fused Triton paths. Triton is imported lazily: without it the backends say why not.

linear_triton: approximate Efficient Attention in two kernels (asked for by name only).
masked_triton: exact flash-attention kernel for RegionMasks; "auto" tries it after sdpa, before masked.
"""


def register(register_backend) -> None:
    """Register the kernel backends with the dispatcher (called by attention.dispatch)."""
    from .linear_triton import LinearTritonBackend
    from .masked_triton import MaskedTritonBackend

    register_backend(LinearTritonBackend())
    register_backend(MaskedTritonBackend(), auto_rank=1)


# When a kernels module is imported before the attention package, load the dispatcher first (it calls
# register() above) so the backends are registered whichever package is imported first.
from .. import attention  # noqa: E402,F401
