"""Attention masks: dense masks read the way ComfyUI reads them, and label-based region masks.

A dense mask is boolean (True = may attend) or additive float (0 / -inf or any bias).
Its rank says what it covers, as in ComfyUI's attention functions:

- 2-D: (N, M)
- 3-D: (B or 1, N or 1, M); a key-padding mask is (B, 1, M)
- 4-D: (B or 1, H or 1, N or 1, M)

Every dense mask is normalised to a 4-D view that broadcasts to (B, H, N, M). Integer masks are read
as boolean (non-zero = may attend); float masks in another dtype than q's are converted to q's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, TypeVar, Union

import torch

T = TypeVar("T")
MASK_FORMS = ("2-D (N, M), 3-D (B or 1, N or 1, M), 4-D (B or 1, H or 1, N or 1, M), "
              "or a RegionMask with labels (B or 1, N) and (B or 1, M)")


@dataclass(frozen=True)
class RegionMask:
    """Region mask given by one integer label per token, never by an N x M tensor.

    query_labels: (B or 1, N) integers; key_labels: (B or 1, M) integers.
    Query i may attend key j when either label is -1 ("everywhere", e.g. text tokens in joint attention) and
    otherwise when their labels are equal, or, with a label table, where ``allowed[query label, key label]``:
    allowed: (Lq, Lk) boolean over the labels >= 0 (e.g. a prompt's text attending only its own region's image);
    bias: (Lq, Lk) float added to those scores (0 for -1 tokens), e.g. log(weight) to weaken a group of keys.
    """

    query_labels: torch.Tensor
    key_labels: torch.Tensor
    allowed: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    _derived: Dict[object, object] = field(default_factory=dict, init=False, repr=False, compare=False)

    def derived(self, key, compute: Callable[[], T]) -> T:
        """``compute()``, once per mask object and ``key``: what backends derive from the labels (token groups,
        block tables) needs device syncs, so a RegionMask reused across calls (the node keeps one per layer
        layout) pays for it once."""
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]

    def __post_init__(self):
        for name, labels in (("query_labels", self.query_labels), ("key_labels", self.key_labels)):
            if not isinstance(labels, torch.Tensor) or labels.ndim != 2:
                shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
                raise ValueError(f"RegionMask {name} must be a 2-D (B or 1, tokens) tensor, got {shape}")
            if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
                raise ValueError(f"RegionMask {name} must hold integer labels, got dtype {labels.dtype}")
        if self.allowed is not None:
            self._check_table()
        elif self.bias is not None:
            raise ValueError("RegionMask bias needs the allowed table it applies to")

    def _check_table(self) -> None:
        allowed, bias = self.allowed, self.bias
        if not isinstance(allowed, torch.Tensor) or allowed.ndim != 2 or allowed.dtype != torch.bool:
            raise ValueError("RegionMask allowed must be a 2-D boolean (query labels, key labels) table")
        labels = tuple(int(t.max()) + 1 if t.numel() else 0 for t in (self.query_labels, self.key_labels))
        if allowed.shape[0] < labels[0] or allowed.shape[1] < labels[1]:
            raise ValueError(f"RegionMask allowed table {tuple(allowed.shape)} does not cover labels up to "
                             f"{labels[0] - 1} (queries) and {labels[1] - 1} (keys)")
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != allowed.shape
                                 or not bias.dtype.is_floating_point):
            raise ValueError(f"RegionMask bias must be a float table of the allowed table's shape "
                             f"{tuple(allowed.shape)}")

    def key_rule(self, query_label: int, key_labels: torch.Tensor):
        """For queries of one label >= 0: (which keys they may attend (M,) boolean, their bias (M,) or None)."""
        everywhere = key_labels == -1
        if self.allowed is None:
            return (key_labels == query_label) | everywhere, None
        index = key_labels.clamp_min(0)
        allowed = self.allowed.to(key_labels.device)[query_label][index] | everywhere
        if self.bias is None:
            return allowed, None
        return allowed, self.bias.to(key_labels.device)[query_label][index].masked_fill(everywhere, 0.0)

    def to_dense(self) -> torch.Tensor:
        """The (B or 1, 1, N, M) mask this region mask stands for (for references and tests): boolean, or additive
        float (0 / bias, -inf where not allowed) with a bias table."""
        ql = self.query_labels[:, :, None]
        kl = self.key_labels[:, None, :]
        everywhere = (ql == -1) | (kl == -1)
        if self.allowed is None:
            return ((ql == kl) | everywhere)[:, None]
        qi, ki = ql.clamp_min(0), kl.clamp_min(0)
        allowed = self.allowed.to(ql.device)[qi, ki] | everywhere
        if self.bias is None:
            return allowed[:, None]
        bias = self.bias.to(ql.device)[qi, ki].masked_fill(everywhere, 0.0)
        return bias.masked_fill(~allowed, float("-inf"))[:, None]

    def with_query_labels(self, query_labels: torch.Tensor) -> "RegionMask":
        """The same rule for other queries (a chunk of them, or the labels moved to another device)."""
        return RegionMask(query_labels, self.key_labels, self.allowed, self.bias)

    def check(self, batch: int, n: int, m: int) -> None:
        ql, kl = self.query_labels, self.key_labels
        if (ql.shape[0] not in (1, batch) or kl.shape[0] not in (1, batch) or ql.shape[1] != n
                or kl.shape[1] != m):
            raise ValueError(
                f"RegionMask labels do not fit the attention call: query_labels {tuple(ql.shape)}, key_labels "
                f"{tuple(kl.shape)}; expected ({batch} or 1, {n}) and ({batch} or 1, {m}) for B={batch}, N={n}, M={m}")


@dataclass(frozen=True)
class NormalizedMask:
    """What every backend sees: a dense 4-D mask view and/or a region mask (both must allow)."""

    dense: Optional[torch.Tensor] = None
    region: Optional[RegionMask] = None

    @property
    def is_key_padding(self) -> bool:
        """True when the dense part only depends on (batch, key): shape (B or 1, 1, 1, M)."""
        return self.dense is not None and self.dense.shape[1] == 1 and self.dense.shape[2] == 1


MaskLike = Union[None, torch.Tensor, RegionMask, Sequence[Union[torch.Tensor, RegionMask]]]


def _dense_to_4d(mask: torch.Tensor, batch: int, heads: int, n: int, m: int, dtype: torch.dtype) -> torch.Tensor:
    shape = tuple(mask.shape)
    if mask.ndim == 2:
        mask4 = mask[None, None]
    elif mask.ndim == 3:
        mask4 = mask[:, None]
    elif mask.ndim == 4:
        mask4 = mask
    else:
        raise ValueError(f"Attention mask of shape {shape} has {mask.ndim} dims; expected {MASK_FORMS}")
    expected = (batch, heads, n, m)
    for axis, (got, want) in enumerate(zip(mask4.shape, expected)):
        fits = got == want if axis == 3 else got in (1, want)
        if not fits:
            raise ValueError(
                f"Attention mask of shape {shape} does not fit B={batch}, H={heads}, N={n}, M={m}: "
                f"expected {MASK_FORMS}")
    if mask4.dtype == torch.bool:
        return mask4
    if not mask4.dtype.is_floating_point:
        if mask4.is_complex():
            raise ValueError(f"Attention mask of dtype {mask4.dtype} is not supported; expected bool or float")
        return mask4 != 0
    return mask4 if mask4.dtype == dtype else mask4.to(dtype)


def combine_dense(a: Optional[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
    """Both dense masks must allow (boolean or additive float; None: only ``b``)."""
    if a is None:
        return b
    if b.dtype == torch.bool:
        return restrict_mask(a, b)
    if a.dtype == torch.bool:
        return restrict_mask(b, a)
    return a + b


def normalize_mask(mask: MaskLike, batch: int, heads: int, n: int, m: int, dtype: torch.dtype,
                   device: torch.device) -> NormalizedMask:
    """Check ``mask`` against (B, H, N, M) and bring it to a NormalizedMask.

    ``mask`` may be a dense tensor, a RegionMask, or a list/tuple of them that must all allow.
    """
    if mask is None:
        return NormalizedMask()
    parts = list(mask) if isinstance(mask, (list, tuple)) else [mask]
    dense, region = None, None
    for part in parts:
        if part is None:
            continue
        if isinstance(part, RegionMask):
            if region is not None:
                raise ValueError("At most one RegionMask per attention call; merge the labels into one")
            part.check(batch, n, m)
            on_device = part.query_labels.device == device and part.key_labels.device == device
            region = part if on_device else RegionMask(part.query_labels.to(device), part.key_labels.to(device),
                                                       part.allowed, part.bias)
        elif isinstance(part, torch.Tensor):
            dense = combine_dense(dense, _dense_to_4d(part.to(device), batch, heads, n, m, dtype))
        else:
            raise TypeError(f"Attention mask must be a tensor or RegionMask, got {type(part).__name__}; "
                            f"expected {MASK_FORMS}")
    return NormalizedMask(dense, region)


def restrict_mask(mask: Optional[torch.Tensor], allowed: torch.Tensor) -> torch.Tensor:
    """Combine a dense mask (bool, additive float or None) with a boolean ``allowed`` mask."""
    if mask is None:
        return allowed
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, float("-inf"))


def rows_without_keys(dense: torch.Tensor) -> torch.Tensor:
    """(B|1, H|1, N|1, 1) boolean: True where a query row may attend no key at all."""
    if dense.dtype == torch.bool:
        return ~dense.any(dim=-1, keepdim=True)
    return torch.isneginf(dense).all(dim=-1, keepdim=True)
