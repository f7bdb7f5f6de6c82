"""Exact, masked multi-head and linear ("efficient") attention behind one dispatcher.

Pure PyTorch (+ einops); imports nothing from ComfyUI.
"""
from .backends.base import AttentionCall, Backend
from .dispatch import (AUTO_PRIORITY, BACKENDS, BackendNotSupported, Explanation, attention, availability, explain,
                       prepare_call, register_backend, run_call, select_backend, why_not)
from .heads import HEADS_MISSING, merge_heads, split_heads
from .layout import TokenLayout
from .masks import NormalizedMask, RegionMask, normalize_mask

__all__ = [
    "AUTO_PRIORITY", "AttentionCall", "BACKENDS", "Backend", "BackendNotSupported", "Explanation", "HEADS_MISSING",
    "NormalizedMask", "RegionMask", "attention", "availability", "explain", "merge_heads",
    "normalize_mask", "prepare_call", "register_backend", "run_call", "select_backend", "split_heads", "TokenLayout", "why_not",
]
