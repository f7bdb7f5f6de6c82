"""Refresh mode: reuse, between steps, what exact attention measured in an earlier step of the sampling run.

In the spirit of DiTFastAttn's "window attention with residual sharing" (Yuan et al., NeurIPS 2024), written
here from the idea. Diffusion sampling calls the same attention layers once per step with slowly changing
inputs, so the difference between exact attention and an approximation changes slowly too. Every ``refresh``
steps a layer computes both, keeps their difference (the residual, exact - approximation) and returns the exact
output; in the steps in between it computes only the approximation and adds the residual it kept.

- A step is one model call. Layers are told apart as the quality guard tells them apart (the n-th served call
  of the model call, with its query and key counts) and by the call's stream: the cond/uncond chunks the model
  call carries (cond_or_uncond), so where a sampler runs cond and uncond in separate model calls their residuals
  and their step counts stay apart. One cache per device (the patch keeps them), like the guard.
- Memory is a budget. A stream's residuals are sized in its first model call of a run with an unknown size
  (the sizing step: its served layers run exact and note the size of their output, nothing is kept), then the
  stream is accepted only if every accepted stream's residuals fit ``budget_bytes``; a refused stream runs the
  plain approximation for the whole run, and the patch logs the reason with the numbers. Nothing is allocated
  before the decision, so a cache that would not fit never runs the device out of memory mid-sampling. The
  sizes are numbers remembered per stream and latent shape (``ResidualSizes``, kept by the caller across runs),
  so a later run of the same shape needs no sizing step. A cache lives for one sampling run.
- Residuals are kept in the dtype of the attention output (the compute dtype: bf16/fp16 on GPU, fp32 on CPU).

``reuse="output"`` (measured in the quality benchmark, not offered by the node: see docs/quality.md) keeps the
exact output itself and returns it unchanged in the steps in between, computing nothing.
"""
from __future__ import annotations

import enum
from typing import Callable, Dict, Hashable, Optional, Tuple

import torch

REUSE_KINDS = ("residual", "output")
GIB = float(1 << 30)
# (stream, latent shape) -> (bytes, the layer keys counted): what a sizing step measured, kept across runs
ResidualSizes = Dict[Tuple[Hashable, Hashable], Tuple[int, frozenset]]


class Phase(enum.Enum):
    """What a model call's served layers do."""

    OFF = "off"  # the plain approximation: outside the schedule window, or refused by the budget
    SIZE = "size"  # the sizing step: exact, each layer notes what it would keep
    REFRESH = "refresh"  # exact, and the residual kept
    REUSE = "reuse"  # the approximation plus the residual kept


class ReuseCache:
    """The refresh mode's state in one sampling run on one device: per stream, the steps of the run so far; per
    layer, its residual. ``sizes``: what sizing steps measured, shared with the runs before and after."""

    def __init__(self, refresh: int, budget_bytes: float, reuse: str = "residual",
                 sizes: Optional[ResidualSizes] = None):
        if refresh < 1:
            raise ValueError(f"refresh must be >= 1 (0 turns the mode off and needs no cache); got {refresh}")
        if reuse not in REUSE_KINDS:
            raise ValueError(f"reuse must be one of {REUSE_KINDS}; got {reuse!r}")
        self.refresh = refresh
        self.budget_bytes = budget_bytes
        self.reuse = reuse
        self.kept: Dict[Hashable, torch.Tensor] = {}  # layer key -> residual (or exact output)
        self.steps: Dict[Hashable, int] = {}  # stream -> model calls of this run so far
        self.offsets: Dict[Hashable, int] = {}  # stream -> 1 where its first call of this run was the sizing step
        self.sizes: ResidualSizes = {} if sizes is None else sizes
        self.accepted: Dict[Hashable, int] = {}  # stream -> bytes, the streams this run keeps caches for
        self.refused: Dict[Hashable, str] = {}  # stream -> why it runs the plain approximation this run
        self.stream: Hashable = None
        self.shape: Hashable = None
        self.phase = Phase.OFF
        self._sizing: Dict[Hashable, int] = {}  # layer key -> bytes, during a sizing step

    # ---- per model call ----
    def begin_model_call(self, stream: Hashable, shape: Hashable) -> Optional[str]:
        """Set what this model call's layers do; returns a warning where the stream's caches are refused."""
        self.stream, self.shape = stream, shape
        step = self.steps.get(stream, 0)
        self.steps[stream] = step + 1
        warning = None
        if step == 0:
            self.offsets[stream] = 0
            if (stream, shape) not in self.sizes:
                self.offsets[stream] = 1
                self._sizing = {}
                self.phase = Phase.SIZE
                return None
            warning = self._decide(stream, shape)
        if stream in self.refused:
            self.phase = Phase.OFF
        else:
            self.phase = Phase.REFRESH if (step - self.offsets[stream]) % self.refresh == 0 else Phase.REUSE
        return warning

    def end_model_call(self) -> Optional[str]:
        """After the sizing step: the budget decision (a warning where refused)."""
        sized, self.phase = self.phase == Phase.SIZE, Phase.OFF
        if not sized:
            return None
        self.sizes[(self.stream, self.shape)] = (sum(self._sizing.values()), frozenset(self._sizing))
        self._sizing = {}
        return self._decide(self.stream, self.shape)

    def _decide(self, stream: Hashable, shape: Hashable) -> Optional[str]:
        needed, layers = self.sizes[(stream, shape)]
        layers = len(layers)
        others = sum(self.accepted.values())
        if needed + others <= self.budget_bytes:
            self.accepted[stream] = needed
            return None
        why = (f"refresh={self.refresh} would keep {needed / GIB:.2f} GiB of residuals for {layers} attention layers"
               + (f" (+{others / GIB:.2f} GiB for other cond/uncond calls)" if others else "")
               + f" of latent {shape}, over the cache budget of {self.budget_bytes / GIB:.2f} GiB")
        self.refused[stream] = why
        return why

    # ---- per served layer ----
    @property
    def sizing(self) -> bool:
        """This model call is a sizing step."""
        return self.phase == Phase.SIZE

    @property
    def on(self) -> bool:
        """This model call's layers use the cache (sizing, refreshing or reusing)."""
        return self.phase != Phase.OFF

    def note_size(self, key: Hashable, out: torch.Tensor) -> None:
        """In the sizing step: what this layer would keep (nothing is allocated)."""
        self._sizing[key] = out.numel() * out.element_size()

    def allows(self, key: Hashable) -> bool:
        """Whether this layer may keep a residual now: a refresh or reuse step, and a layer the budget counted."""
        sized = self.sizes.get((self.stream, self.shape))
        return self.phase in (Phase.REFRESH, Phase.REUSE) and sized is not None and key in sized[1]

    def residual(self, key: Hashable, like: torch.Tensor) -> Optional[torch.Tensor]:
        kept = self.kept.get(key)
        return kept if kept is not None and kept.shape == like.shape else None

    def store(self, key: Hashable, exact_out: torch.Tensor, approx_out: Optional[torch.Tensor]) -> None:
        if self.reuse == "output":
            self.kept[key] = exact_out.detach().clone()
        else:
            self.kept[key] = (exact_out - approx_out).detach()

    def drop(self, key: Hashable) -> None:
        self.kept.pop(key, None)

    @property
    def kept_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kept.values())

    def attend(self, key: Hashable, exact: Callable[[], torch.Tensor],
               approximate: Callable[[Optional[torch.Tensor]], torch.Tensor]) -> torch.Tensor:
        """One served call of layer ``key`` in this model call's phase (``approximate`` as the guard takes it)."""
        phase = self.phase
        if phase == Phase.OFF or (phase != Phase.SIZE and not self.allows(key)):
            return approximate(None)  # refused by the budget, or a layer it did not count
        if phase == Phase.SIZE:
            out = exact()
            self.note_size(key, out)
            return out
        approx_out = None
        if phase == Phase.REUSE:
            if self.reuse == "output" and key in self.kept:
                return self.kept[key]
            if self.reuse == "residual":
                approx_out = approximate(None)
                kept = self.residual(key, approx_out)
                if kept is not None:
                    return approx_out.add_(kept) if not approx_out.requires_grad else approx_out + kept
        # a refresh step, or a layer with nothing kept that fits (e.g. new in this step): the approximation computed
        # above is the one the residual is taken against
        out = exact()
        if self.reuse == "residual" and approx_out is None:
            approx_out = approximate(out)
        self.store(key, out, approx_out)
        return out


    def close(self) -> None:
        """The run is over: drop every tensor it kept (the sizes stay, as numbers)."""
        self.kept.clear()
        self._sizing.clear()
        self.phase = Phase.OFF
