"""One entry point: validate, pick a backend (or use the one asked for), run it, restore the layout."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from .backends.agent import AgentBackend
from .backends.base import AttentionCall, Backend
from .backends.linear import LinearBackend
from .backends.masked import MaskedBackend
from .backends.sdpa import SDPABackend
from .backends.tiles import TileBackend
from .backends.todo import ToDoBackend
from .backends.window import WindowBackend
from .heads import merge_heads, qk_layernorm, split_heads
from .layout import TokenLayout
from .masks import MaskLike, normalize_mask

BACKENDS: Dict[str, Backend] = {}
# The order "auto" tries; only exact backends are ever picked by "auto".
AUTO_PRIORITY: List[str] = []


def register_backend(backend: Backend, auto_rank: Optional[int] = None) -> None:
    """Add a backend; with ``auto_rank`` it is also tried by "auto" at that position of the priority list."""
    BACKENDS[backend.name] = backend
    if auto_rank is not None and backend.exact and backend.name not in AUTO_PRIORITY:
        AUTO_PRIORITY.insert(auto_rank, backend.name)


register_backend(SDPABackend(), auto_rank=0)
register_backend(MaskedBackend(), auto_rank=1)
register_backend(LinearBackend())
register_backend(ToDoBackend())
register_backend(AgentBackend())
register_backend(WindowBackend())
register_backend(TileBackend())


def _register_kernels() -> None:
    """Register the optional kernel backends of kernels/ (beside this package inside the pack)."""
    pack = __package__.rpartition(".")[0]
    if not pack:  # attention/ used on its own as a top-level package: no kernels beside it
        return
    importlib.import_module(f"{pack}.kernels").register(register_backend)


class BackendNotSupported(ValueError):
    """An explicitly requested backend cannot serve these inputs; the message lists why."""


@dataclass
class Explanation:
    """Which backend "auto" picks for a call and why each other backend was passed over."""

    chosen: str
    passed_over: Dict[str, List[str]] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"auto picks: {self.chosen}"]
        for name, reasons in self.passed_over.items():
            lines.append(f"  {name}: " + "; ".join(reasons))
        return "\n".join(lines)


def backend_options(keywords: Dict[str, object]) -> Dict[str, object]:
    """The keywords that are some backend's option (e.g. downsample, agents); the rest are ComfyUI's own."""
    names = {name for backend in BACKENDS.values() for name in backend.option_defaults}
    return {name: value for name, value in keywords.items() if name in names}


def prepare_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: MaskLike = None, *,
                 layernorm: bool = False, scale: Optional[float] = None, skip_reshape: bool = False,
                 is_causal: bool = False, enable_gqa: bool = False, layout: Optional[TokenLayout] = None,
                 options: Optional[Dict[str, object]] = None) -> AttentionCall:
    """Validate the inputs (ValueError naming the shapes and what was expected) and bring them to the
    split-head form every backend takes."""
    qh, kh, vh = split_heads(q, k, v, heads, skip_reshape=skip_reshape, enable_gqa=enable_gqa)
    if layernorm:
        qh, kh = qk_layernorm(qh), qk_layernorm(kh)
    batch, h, n, _ = qh.shape
    normalized = normalize_mask(mask, batch, h, n, kh.shape[2], qh.dtype, qh.device)
    return AttentionCall(qh, kh, vh, normalized, scale, bool(is_causal), bool(enable_gqa) and kh.shape[1] != h,
                         layout, dict(options or {}))


def _choose(call: AttentionCall):
    passed_over: Dict[str, List[str]] = {}
    chosen = None
    for name in AUTO_PRIORITY:
        reasons = BACKENDS[name].not_supported_reasons(call)
        if chosen is None and not reasons:
            chosen = name
        elif chosen is None:
            passed_over[name] = reasons
        else:
            passed_over[name] = [f"lower priority than {chosen}"]
    for name, backend in BACKENDS.items():
        if not backend.exact:
            passed_over[name] = ["approximate: used only when asked for by name"]
    if chosen is None:  # masked serves every valid input on CPU and CUDA; only exotic devices end here
        raise BackendNotSupported("No attention backend supports these inputs:\n" + str(Explanation("none", passed_over)))
    return chosen, passed_over


def select_backend(call: AttentionCall, backend: str = "auto") -> str:
    """The backend that runs ``call``: "auto" picks the fastest exact one; a named backend must exist and
    support the call (BackendNotSupported lists why not)."""
    if backend == "auto":
        return _choose(call)[0]
    if backend not in BACKENDS:
        raise ValueError(f"Unknown attention backend {backend!r}; expected 'auto' or one of {sorted(BACKENDS)}")
    foreign = sorted(set(call.options) - set(BACKENDS[backend].option_defaults))
    if foreign:
        takes = ", ".join(BACKENDS[backend].option_defaults) or "none"
        raise ValueError(f"Attention backend {backend!r} takes no option {', '.join(foreign)} (its options: {takes})")
    reasons = BACKENDS[backend].not_supported_reasons(call)
    if reasons:
        raise BackendNotSupported(f"Attention backend {backend!r} cannot serve these inputs: " + "; ".join(reasons))
    return backend


def run_call(call: AttentionCall, backend: str, skip_output_reshape: bool = False) -> torch.Tensor:
    """Run a prepared call on a backend that supports it: (B, N, H*Dv), or (B, H, N, Dv) with skip_output_reshape."""
    out = BACKENDS[backend].forward(call)
    return out if skip_output_reshape else merge_heads(out)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: MaskLike = None,
              attn_precision=None, *, backend: str = "auto", layernorm: bool = False, scale: Optional[float] = None,
              skip_reshape: bool = False, skip_output_reshape: bool = False, is_causal: bool = False,
              enable_gqa: bool = False, layout: Optional[TokenLayout] = None, **keywords) -> torch.Tensor:
    """Multi-head attention, drop-in compatible with ComfyUI's ``optimized_attention``.

    q (B, N, H*D), k (B, M, Hkv*D), v (B, M, Hkv*Dv) -> (B, N, H*Dv); with ``skip_reshape`` the inputs
    are (B, H, N, D) / (B, Hkv, M, D|Dv), with ``skip_output_reshape`` the output is (B, H, N, Dv).
    ``mask``: dense bool/additive tensor, RegionMask, or a list of them (see masks.py).
    ``backend``: "auto" (fastest exact backend for these inputs) or a name from ``BACKENDS``.
    ``layout``: where the image tokens are among the keys (TokenLayout), for backends that need it (todo, agent).
    ``keywords``: a named backend's options (e.g. ``downsample=2`` for todo; a backend refuses options it does
    not take, "auto" ignores them); ``attn_precision`` and other ComfyUI keywords (``transformer_options``,
    ...) are accepted and ignored: every backend accumulates the softmax in fp32.
    """
    call = prepare_call(q, k, v, heads, mask, layernorm=layernorm, scale=scale, skip_reshape=skip_reshape,
                        is_causal=is_causal, enable_gqa=enable_gqa, layout=layout,
                        options=backend_options(keywords) if backend != "auto" else None)
    return run_call(call, select_backend(call, backend), skip_output_reshape)


def explain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: MaskLike = None, *,
            layernorm: bool = False, scale: Optional[float] = None, skip_reshape: bool = False,
            is_causal: bool = False, enable_gqa: bool = False, layout: Optional[TokenLayout] = None) -> Explanation:
    """Which backend ``attention(..., backend="auto")`` picks for these inputs, and why not the others."""
    call = prepare_call(q, k, v, heads, mask, layernorm=layernorm, scale=scale, skip_reshape=skip_reshape,
                        is_causal=is_causal, enable_gqa=enable_gqa, layout=layout)
    return Explanation(*_choose(call))


def why_not(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: MaskLike = None, *,
            layernorm: bool = False, scale: Optional[float] = None, skip_reshape: bool = False,
            is_causal: bool = False, enable_gqa: bool = False, layout: Optional[TokenLayout] = None,
            **options) -> List[str]:
    """Every reason ``backend`` cannot serve these inputs (an empty list when it can)."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown attention backend {backend!r}; expected one of {sorted(BACKENDS)}")
    call = prepare_call(q, k, v, heads, mask, layernorm=layernorm, scale=scale, skip_reshape=skip_reshape,
                        is_causal=is_causal, enable_gqa=enable_gqa, layout=layout, options=options)
    return BACKENDS[backend].not_supported_reasons(call)


def availability() -> Dict[str, Optional[str]]:
    """Backend name -> None when it can run here, else why not."""
    return {name: backend.unavailable_reason() for name, backend in BACKENDS.items()}


_register_kernels()
