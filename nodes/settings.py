"""The node's choices, translated and checked when the node runs: PatchSettings, and every refusal of a choice that
cannot work with this model on this machine (unknown backend, heads that do not divide, a malformed mask).

Only a user's own impossible choice stops sampling, and it does so here, before sampling starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Optional

import torch

from ..attention import BACKENDS
from ..attention.regions import RegionMasker
from .log import NODE_NAME

APPLY_TO = ("both", "self-attention", "cross-attention")


@dataclass(frozen=True)
class PatchSettings:
    """The node's choices, translated.

    backend, heads, layernorm, apply_to, min_tokens, strength: as the node's inputs. sigma_start, sigma_end: the
    schedule window (active while sigma_end <= sigma <= sigma_start). mask: ComfyUI MASK (B, H, W) or (H, W), with
    ``mask_mode``; ``masker``: the two, checked, as region labels for any call. options: the chosen backend's
    options (e.g. downsample). max_error: the quality guard's bound (0 = off). refresh: exact attention every
    ``refresh`` steps, its residual reused between (0 = off). cache_gb: the refresh mode's budget per device, GiB.
    regions_only: the patch of Regional Prompts (PoP): it serves only calls with regional prompts, exact, and passes
    the rest on (also those, where another of the pack's patches is behind it and applies them).
    """

    backend: str = "auto"
    heads: int = 0
    layernorm: bool = False
    apply_to: str = "both"
    min_tokens: int = 0
    strength: float = 1.0
    sigma_start: float = float("inf")
    sigma_end: float = 0.0
    mask: Optional[torch.Tensor] = None
    mask_mode: str = "isolate regions"
    options: Dict[str, object] = field(default_factory=dict)
    max_error: float = 0.0
    refresh: int = 0
    cache_gb: float = 8.0
    regions_only: bool = False
    masker: Optional[RegionMasker] = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self):
        if self.backend != "auto" and self.backend not in BACKENDS:
            raise ValueError(backend_problem(self.backend))
        if self.apply_to not in APPLY_TO:
            raise ValueError(f"apply_to must be one of {APPLY_TO}, got {self.apply_to!r}")
        if self.mask is not None:  # the mask and its mode checked once, here, when the node runs
            object.__setattr__(self, "masker", RegionMasker(self.mask, self.mask_mode))
        if self.refresh < 0 or self.cache_gb < 0:
            raise ValueError(f"refresh and cache_gb must be >= 0; got refresh={self.refresh}, cache_gb={self.cache_gb}")
        if self.heads < 0 or self.min_tokens < 0 or not 0.0 <= self.strength <= 1.0 or self.max_error < 0:
            raise ValueError(f"heads, min_tokens and max_error must be >= 0 and strength in [0, 1]; got "
                             f"heads={self.heads}, min_tokens={self.min_tokens}, max_error={self.max_error}, "
                             f"strength={self.strength}")

    @property
    def full_window(self) -> bool:
        return self.sigma_start == float("inf") and self.sigma_end <= 0.0

    def active_at(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start

    def active_for(self, sigmas) -> bool:
        """Inside the schedule window at a call's ``sigmas`` (read only where the window is not the whole
        schedule; a call that passes none is inside)."""
        if self.full_window:
            return True
        sigma = sigma_of(sigmas)
        return sigma is None or self.active_at(sigma)

    @property
    def approximates(self) -> bool:
        """The chosen backend is an approximation."""
        return self.backend != "auto" and not BACKENDS[self.backend].exact

    @property
    def refreshes(self) -> bool:
        """The refresh mode is on (an approximation, and refresh > 0)."""
        return self.approximates and self.refresh > 0


def sigma_of(sigmas) -> Optional[float]:
    """A call's sigma as a number (one host read), or None where it passes no sigmas."""
    if isinstance(sigmas, torch.Tensor) and sigmas.numel():
        return float(sigmas.flatten()[0])
    return None


def usable_backends():
    """"auto" and the backends the node offers that can run on this machine, in the order the node lists them."""
    return ["auto"] + [name for name, backend in BACKENDS.items()
                       if backend.not_in_node is None and backend.unavailable_reason() is None]


def backend_problem(backend: str) -> Optional[str]:
    """Why the node cannot use ``backend`` on this machine (None when it can), in words for the node's user."""
    if backend in usable_backends():
        return None
    choices = ", ".join(usable_backends())
    if backend not in BACKENDS:
        return f"{NODE_NAME}: unknown backend {backend!r}; choose one of {choices}"
    if BACKENDS[backend].not_in_node:
        return f"{NODE_NAME}: backend {backend!r} is not offered by the node: {BACKENDS[backend].not_in_node}; " \
               f"choose one of {choices}"
    return (f"{NODE_NAME}: backend {backend!r} is not available on this machine "
            f"({BACKENDS[backend].unavailable_reason()}); choose one of {choices}")


HEAD_COUNT_ATTRIBUTES = ("heads", "num_heads", "n_heads", "heads_num", "n_local_heads", "num_attention_heads")
HEAD_DIM_ATTRIBUTES = ("dim_head", "head_dim", "d_head", "dim_heads", "attention_head_dim")
QUERY_PROJECTIONS = {"to_q": 1, "q": 1, "q_proj": 1, "wq": 1, "query": 1, "qkv": 3, "to_qkv": 3, "qkv_proj": 3,
                     "img_attn_qkv": 3}  # JoyImage


def attention_widths(diffusion_model) -> frozenset:
    """The q widths (heads * dim_head) of every attention module of a diffusion model that says them: an
    integer head count beside a head dim, or beside its query projection (a Linear, or a fused q/k/v one).
    Empty when none is found, so the node cannot check ``heads`` before sampling."""
    widths = set()
    for module in diffusion_model.modules():
        heads = next((getattr(module, name) for name in HEAD_COUNT_ATTRIBUTES
                      if isinstance(getattr(module, name, None), int)), None)
        if not heads or heads <= 0:
            continue
        dim = next((getattr(module, name) for name in HEAD_DIM_ATTRIBUTES
                    if isinstance(getattr(module, name, None), int)), None)
        if dim:
            widths.add(heads * dim)
            continue
        for name, parts in QUERY_PROJECTIONS.items():
            projection = getattr(module, name, None)
            out_features = getattr(projection, "out_features", None)
            if isinstance(out_features, int) and out_features % parts == 0:
                widths.add(out_features // parts)
                break
    return frozenset(widths)


def heads_mismatch_message(heads: int, widths, q_shape=None, k_shape=None) -> str:
    """The error for a ``heads`` choice that does not divide the attention widths, starting with the words
    users search for; with q's and k's shapes, it names the one layer where it was found."""
    widths = sorted(set(widths))
    common = widths[0]
    for width in widths[1:]:
        common = _gcd(common, width)
    divisors = [d for d in range(1, common + 1) if common % d == 0]
    shown = ", ".join(str(d) for d in divisors[:10]) + (", ..." if len(divisors) > 10 else "")
    where = (f"this attention layer's {widths[0]} channels (q {tuple(q_shape)}, k {tuple(k_shape)})"
             if q_shape is not None else f"this model's attention widths ({', '.join(map(str, widths))} channels)")
    return (f"Mismatch in tensor dimensions: {NODE_NAME} heads={heads} does not divide {where}; use 0 (the "
            f"model's own heads) or a divisor of {common} such as {shown}")


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def check_choices(settings: PatchSettings, diffusion_model) -> None:
    """Refuse, before sampling starts, a choice that cannot work with this model on this machine."""
    problem = backend_problem(settings.backend)
    if problem:
        raise ValueError(problem)
    if settings.heads:
        widths = attention_widths(diffusion_model)
        if any(width % settings.heads for width in widths):
            raise ValueError(heads_mismatch_message(settings.heads, widths))


def settings_for_model(model, *, start_percent: float, end_percent: float, **choices) -> PatchSettings:
    """PatchSettings with the schedule window converted by the model's own model_sampling."""
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent and end_percent must satisfy 0 <= start <= end <= 1; got {start_percent}, "
                         f"{end_percent}")
    sampling = (model.get_model_object("model_sampling") if hasattr(model, "get_model_object")
                else model.model.model_sampling)  # ComfyUI before mid-2024
    sigma_start = float("inf") if start_percent <= 0.0 else float(sampling.percent_to_sigma(start_percent))
    sigma_end = 0.0 if end_percent >= 1.0 else float(sampling.percent_to_sigma(end_percent))
    return replace(PatchSettings(**choices), sigma_start=sigma_start, sigma_end=sigma_end)
