"""What every backend is: a small class that declares what it supports and says why not."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import torch

from ..heads import repeat_kv_heads
from ..layout import TokenLayout
from ..masks import NormalizedMask


@dataclass
class AttentionCall:
    """One attention call in split-head form, after validation.

    q: (B, H, N, D); k: (B, Hkv, M, D); v: (B, Hkv, M, Dv); Hkv == H unless enable_gqa.
    layout: where the image tokens are among the keys (and the queries, for self-attention), if known.
    options: backend options by name (e.g. downsample=2); a backend reads its own through Backend.option.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: NormalizedMask
    scale: Optional[float] = None
    is_causal: bool = False
    enable_gqa: bool = False
    layout: Optional[TokenLayout] = None
    options: Dict[str, object] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    def with_kv_heads_repeated(self) -> "AttentionCall":
        """This call with grouped-query k/v repeated to q's heads (itself where there is no GQA), for backends
        that serve GQA that way (the grid approximations and linear)."""
        if not self.enable_gqa:
            return self
        heads = self.q.shape[1]
        return replace(self, k=repeat_kv_heads(self.k, heads), v=repeat_kv_heads(self.v, heads), enable_gqa=False)


ANY, KEY_PADDING, NONE = "any", "key-padding", "none"  # the dense masks a backend takes


class Backend:
    """Base class. Subclasses set ``name``, ``exact`` and what they support, and implement ``forward``; the
    standard reasons for what they do not support come from these declarations (``not_supported_reasons``).

    causal, gqa: whether is_causal and grouped-query attention are supported. dense_masks: ANY, KEY_PADDING (only
    (B|1, 1, 1, M) masks) or NONE. region_masks: None where RegionMasks are supported, else why not; region_tables:
    whether those may carry a label table (allowed, bias) instead of equal labels.
    """

    name: str = ""
    exact: bool = True
    description: str = ""
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    devices = ("cpu", "cuda")
    causal = True
    gqa = True
    dense_masks = ANY
    region_masks: Optional[str] = None
    region_tables = False
    option_defaults: Dict[str, object] = {}  # the options this backend takes, with their defaults
    not_in_node: Optional[str] = None  # why the ComfyUI node does not offer this backend (None: it does)
    benchmark_options: Tuple[Dict[str, object], ...] = ({},)  # the option sets the quality benchmark measures

    def unavailable_reason(self) -> Optional[str]:
        """Why this backend cannot run in this environment at all (None when it can)."""
        return None

    def slow_reason(self) -> Optional[str]:
        """Why this backend runs here, but only as a correctness check, not at speed (None when it runs at speed);
        benchmarks leave such backends out and say why."""
        return None

    def option(self, call: "AttentionCall", name: str):
        """The call's value of one of this backend's options, or its default."""
        return call.options.get(name, self.option_defaults[name])

    def not_supported_reasons(self, call: AttentionCall) -> List[str]:
        """Every reason this backend cannot serve ``call`` (empty when it can)."""
        reasons = []
        unavailable = self.unavailable_reason()
        if unavailable:
            reasons.append(f"not available: {unavailable}")
        if call.device.type not in self.devices:
            reasons.append(f"device {call.device.type} not supported (supports {', '.join(self.devices)})")
        if call.dtype not in self.dtypes:
            reasons.append(f"dtype {call.dtype} not supported")
        if call.q.dtype != call.k.dtype or call.q.dtype != call.v.dtype:
            reasons.append(f"q, k and v dtypes differ ({call.q.dtype}, {call.k.dtype}, {call.v.dtype})")
        return reasons + self.declared_reasons(call)

    def declared_reasons(self, call: AttentionCall) -> List[str]:
        """The call's features this backend declares it does not support, in standard words."""
        reasons = []
        if call.is_causal and not self.causal:
            reasons.append("is_causal is not supported")
        if call.k.shape[1] != call.q.shape[1] and not self.gqa:
            reasons.append("grouped-query attention (fewer k/v heads than q heads) is not supported")
        region = call.mask.region
        if region is not None and self.region_masks:
            reasons.append(self.region_masks)
        elif region is not None and region.allowed is not None and not self.region_tables:
            reasons.append("region masks with a label table (allowed, bias) are not supported; backend 'masked' "
                           "serves them")
        dense = call.mask.dense
        if dense is not None and self.dense_masks == NONE:
            reasons.append("dense masks are not supported (only RegionMask or no mask)")
        elif dense is not None and self.dense_masks == KEY_PADDING and not call.mask.is_key_padding:
            reasons.append(f"dense mask of shape {tuple(dense.shape)} is not a key-padding mask (B or 1, 1, 1, M); "
                           "only key-padding masks are supported")
        return reasons

    def forward(self, call: AttentionCall) -> torch.Tensor:
        """Return (B, H, N, Dv) in q's dtype."""
        raise NotImplementedError


def tracing() -> bool:
    """True while torch.compile traces the caller: data-dependent branches (a tensor read as a Python
    bool) would break the graph there, so backends take their branch-free path."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)  # torch >= 2.3
    return bool(is_compiling and is_compiling())


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """CPUs without fast half-precision matmuls compute in fp32; GPUs keep the input dtype."""
    return torch.float32 if t.device.type == "cpu" else t.dtype
