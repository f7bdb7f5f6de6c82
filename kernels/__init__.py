"""Optional fused Triton paths. Triton is imported lazily: without it the backends say why not."""


def register(register_backend) -> None:
    """Register the kernel backends with the dispatcher (called by attention.dispatch)."""
