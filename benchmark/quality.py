"""Quality benchmark: how far each backend moves the images of a model with learned attention, beside its speed.

The model is the proxy DiT of benchmark/proxy (trained here on photographs: local, sharp, learned attention;
Flux-like joint attention over 4 class tokens and the image tokens). For each image size it samples a few
images (fixed noise, classes and steps) with exact attention and with every backend and option set the pack
has (``Backend.benchmark_options``), and reports:

- PSNR and SSIM of each final image against the exact image from the same noise (exact backends give the
  float noise floor); for videos (the video proxy, ``frames``), frame by frame, and how the frames change from one
  to the next against the exact video's changes (metrics.motion_ratio, metrics.temporal_error);
- the mean, over layers, of the attention output's cosine similarity and relative L2 error against exact
  attention, on the same q, k, v along the exact trajectory (every step, every layer);
- attention time and whole-denoiser time as a speedup, exact time / backend time (higher is faster), from one
  denoiser call at t = 0.5: every round times the exact model and every variant one after another (the order
  rotating), each round gives one ratio per variant, and a row reports the median ratio and the lowest and
  highest. ``sdpa`` computes what the reference computes, so its ratio should be 1 within that spread: where
  it is not, a note says that the timings of that size are not to be trusted (the machine's load changed
  during the run).

The proxy is a small model trained on a few photographs: it ranks methods and shows the size of their
errors; it is not FID on SDXL. ``quality --comfyui-model`` measures a user's own model (comfy_quality.py).
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..attention import BACKENDS, TokenLayout, attention, why_not
from .metrics import cosine, frames_as_images, motion_ratio, psnr_db, relative_l2, ssim, temporal_error
from .table import markdown_table

EXACT = "exact"  # the model's own attention (torch SDPA): the reference every row is measured against


@dataclass(frozen=True)
class Variant:
    """One backend with one option set, the node's refresh mode (refresh > 0: exact attention every ``refresh``
    steps, its residual, or with ``reuse="output"`` its output, reused in between) and the node's quality guard
    around it (max_error > 0)."""

    backend: str
    options: Tuple[Tuple[str, object], ...] = ()
    max_error: float = 0.0
    refresh: int = 0
    reuse: str = "residual"

    @property
    def label(self) -> str:
        refresh = [f"refresh={self.refresh}"] * bool(self.refresh) + [f"reuse={self.reuse}"] * (self.reuse != "residual")
        guard = [f"max_error={self.max_error:g}"] if self.max_error else []
        return " ".join([self.backend] + [f"{name}={value}" for name, value in self.options] + refresh + guard)

    def attention_fn(self) -> Callable:
        """The proxy model's attention hook running this backend: (q, k, v, layout, layer) -> out, all (B, H, N, D).
        With max_error, a fresh quality guard as the node runs it (one sampling run per hook)."""
        options = dict(self.options)

        def run(q, k, v, layout, layer_index):
            return attention(q, k, v, q.shape[1], backend=self.backend, layout=layout, skip_reshape=True,
                             skip_output_reshape=True, **options)

        if self.refresh:
            return self._refreshed(run)
        if not self.max_error:
            return run
        from ..nodes.guard import QualityGuard

        guard = QualityGuard(self.max_error)

        def guarded(q, k, v, layout, layer_index):
            if layer_index == 0 and guard.layers:
                guard.end_model_call()  # the model starts its next call
            return guard.attend((layer_index, q.shape[2], k.shape[2]), q.shape[2],
                                lambda: F.scaled_dot_product_attention(q, k, v),
                                lambda exact_out: run(q, k, v, layout, layer_index))

        return guarded

    def _refreshed(self, run: Callable) -> Callable:
        """The refresh mode as the node runs it (nodes/approximation.py and reuse.py; one model call = one step, one
        stream: the proxy batches cond and uncond), under the guard where max_error > 0; no budget limit (the
        proxy's caches are small: 5 layers of (2B, N, 128))."""
        from ..nodes.approximation import ApproximationServer
        from ..nodes.guard import QualityGuard
        from ..nodes.reuse import ReuseCache

        sizes = {}  # what the node keeps across runs: the residual sizes
        state = {}

        def new_run():  # a new sampling run in the node: the cache and guard start again, the sizes stay known
            if state.get("model_calls"):
                state["server"].end_model_call()
            state["server"] = ApproximationServer(QualityGuard(self.max_error) if self.max_error else None,
                                                  ReuseCache(self.refresh, float("inf"), self.reuse, sizes))
            state["model_calls"] = 0
            refreshed.cache, refreshed.guard = state["server"].cache, state["server"].guard

        def refreshed(q, k, v, layout, layer_index):
            server = state["server"]
            if layer_index == 0:  # the model starts its next call
                if state["model_calls"]:
                    server.end_model_call()
                state["model_calls"] += 1
                server.begin_model_call("batch", tuple(q.shape), True)
            return server.serve((layer_index, q.shape[2], k.shape[2]), q.shape[2],
                                lambda: F.scaled_dot_product_attention(q, k, v),
                                lambda exact_out: run(q, k, v, layout, layer_index))

        new_run()
        refreshed.new_run = new_run  # for time_runs, tests, the table
        return refreshed


@dataclass
class QualityRow:
    """One row of the table; the JSON output has one object per row with these keys."""

    backend: str
    options: Dict[str, object]
    exact: bool
    max_error: float
    image_size: int
    tokens: int
    attention_speedup: float  # exact time / backend time: median of the rounds' ratios, higher is faster
    denoiser_speedup: float
    attention_speedup_range: Tuple[float, float]  # the lowest and highest ratio of the rounds
    denoiser_speedup_range: Tuple[float, float]
    rounds: int
    psnr_db: float
    ssim: float
    attn_cosine: float
    attn_rel_l2: float
    refresh: int = 0  # the refresh mode's period (0: off)
    reuse: str = ""  # what the refresh mode reuses between refreshes ("residual", "output"; "" when off)
    frames: int = 1  # a video's frames (1: images); image_size is then each frame's size in pixels
    motion: Optional[float] = None  # videos: mean |frame-to-frame change| / the exact video's (1 = as much motion)
    temporal_error: Optional[float] = None  # videos: relative L2 of the frame-to-frame changes against exact
    # Whole sampling runs (refresh rows, measured with the exact run in interleaved rounds): exact run's total time /
    # this run's, attention calls and denoiser calls; None for the rows timed on one denoiser call only
    run_attention_speedup: Optional[float] = None
    run_denoiser_speedup: Optional[float] = None
    run_attention_speedup_range: Optional[Tuple[float, float]] = None
    run_denoiser_speedup_range: Optional[Tuple[float, float]] = None
    cache_mib: Optional[float] = None  # what the refresh mode kept at the end of the run (MiB), None when off


@dataclass(frozen=True)
class QualitySetup:
    """What is sampled: classes (one image each, or one video of ``frames`` frames) with fixed noise seed, steps and
    guidance."""

    classes: Tuple[int, ...] = (1, 2, 8, 12)
    steps: int = 12
    seed: int = 0
    guidance: float = 2.0
    repeats: int = 3
    frames: int = 0  # 0: images; else videos of this many frames (a video proxy)


QUICK = QualitySetup(classes=(1, 8), steps=8, repeats=5)  # rounds are cheap at 32 and 64 px
DEFAULT_SIZES = (32, 64, 128)  # 1x, 4x and 16x the training token count (256 image tokens at 32 px)
QUICK_SIZES = (32, 64)
VIDEO = QualitySetup(classes=(1, 2), steps=8, repeats=3, frames=16)  # 16 frames of 64 px: 16,384 image tokens
VIDEO_SIZES = (64,)


def variants(backends: Optional[Sequence[str]] = None, max_errors: Sequence[float] = (), refreshes: Sequence[int] = (),
             reuses: Sequence[str] = ("residual",), options: Optional[Sequence[Dict[str, object]]] = None
             ) -> Tuple[List[Variant], List[str]]:
    """Every backend's benchmark option sets (or those of ``backends``; with ``options``, for each approximate
    backend those of these option sets whose names it takes, the rest at its defaults), each approximate one also
    under the quality guard at every bound of ``max_errors``, and with the refresh mode at every period of
    ``refreshes`` (each kind of ``reuses``; with every bound of ``max_errors`` too); and notes on the backends left
    out."""
    chosen, notes = [], []
    for name, backend in BACKENDS.items():
        if backends is not None and name not in backends:
            continue
        reason = backend.unavailable_reason() or backend.slow_reason()
        if reason:
            notes.append(f"{name}: not measured ({reason})")
            continue
        option_sets = backend.benchmark_options
        if options is not None and not backend.exact:
            option_sets = [{**backend.option_defaults, **wanted} for wanted in options
                           if set(wanted) <= set(backend.option_defaults)]
        for options_of_backend in option_sets:
            frozen = tuple(sorted(options_of_backend.items()))
            chosen.append(Variant(name, frozen))
            if not backend.exact:
                chosen.extend(Variant(name, frozen, bound) for bound in max_errors)
                chosen.extend(Variant(name, frozen, bound, refresh, reuse) for refresh in refreshes for reuse in reuses
                              for bound in (0.0, *max_errors))
    return chosen, notes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class LayerErrors:
    """Per variant and layer: the sums of cosine and relative L2 over the calls seen, and their count."""

    sums: Dict[Tuple[str, int], List[float]] = field(default_factory=dict)

    def add(self, label: str, layer: int, out: torch.Tensor, exact: torch.Tensor) -> None:
        entry = self.sums.setdefault((label, layer), [0.0, 0.0, 0])
        entry[0] += cosine(out, exact)
        entry[1] += relative_l2(out, exact)
        entry[2] += 1

    def mean(self, label: str) -> Tuple[float, float]:
        """Mean over layers of each layer's mean cosine and relative L2."""
        layers = [entry for (name, _), entry in self.sums.items() if name == label]
        return (statistics.fmean(e[0] / e[2] for e in layers), statistics.fmean(e[1] / e[2] for e in layers))


def sample(model, setup: QualitySetup, size: int, attention_fn: Optional[Callable]) -> torch.Tensor:
    """The setup's images at ``size`` pixels with ``attention_fn`` (None: exact) -> (B, 3, size, size) in [0, 1],
    or its videos (B, 3, frames, size, size)."""
    from .proxy import sample_images

    images = sample_images(model, setup.classes, size=size, steps=setup.steps, seed=setup.seed,
                           attention_fn=attention_fn, guidance=setup.guidance, frames=setup.frames or None)
    return (images.float().cpu() + 1) / 2


def exact_trajectory(model, setup: QualitySetup, size: int, measured: List[Variant]) -> Tuple[torch.Tensor, LayerErrors]:
    """The exact images, and every variant's attention error on the exact trajectory's q, k, v."""
    errors = LayerErrors()
    functions = [(variant.label, variant.attention_fn()) for variant in measured]

    def measuring(q, k, v, layout, layer_index):
        exact = F.scaled_dot_product_attention(q, k, v)
        for label, function in functions:
            errors.add(label, layer_index, function(q, k, v, layout, layer_index), exact)
        return exact

    return sample(model, setup, size, measuring), errors


def time_denoiser(model, setup: QualitySetup, size: int, measured: List[Variant], progress=None
                  ) -> Dict[str, List[Tuple[float, float]]]:
    """label -> [(attention seconds, denoiser seconds) of one guided denoiser call at t = 0.5, per round]:
    rounds interleaved across the exact model (label EXACT) and every variant, the order rotating from round to
    round; one warm-up round first, not kept."""
    parameter = next(model.parameters())
    device = parameter.device
    batch = 2 * len(setup.classes) if setup.guidance != 1.0 else len(setup.classes)
    gen = torch.Generator().manual_seed(setup.seed + 1)
    frames = (setup.frames,) if setup.frames else ()
    x = torch.randn((batch, model.config.channels) + frames + (size, size), generator=gen).to(device=device,
                                                                                              dtype=parameter.dtype)
    t = torch.full((batch,), 0.5, device=device)
    labels = torch.arange(batch, device=device) % (model.config.num_classes + 1)
    functions = {EXACT: lambda q, k, v, layout, layer_index: F.scaled_dot_product_attention(q, k, v)}
    functions.update((variant.label, variant.attention_fn()) for variant in measured)
    times: Dict[str, List[Tuple[float, float]]] = {label: [] for label in functions}

    labels_in_order = list(functions)
    with torch.no_grad():
        for round_index in range(setup.repeats + 1):
            shift = round_index % len(labels_in_order)
            for label in labels_in_order[shift:] + labels_in_order[:shift]:
                if progress is not None:
                    progress(f"timing {label} ({round_index}/{setup.repeats})")
                spent = [0.0]
                _sync(device)
                start = time.perf_counter()
                model(x, t, labels, attention_fn=_timed(functions[label], spent, device))
                _sync(device)
                if round_index:  # round 0 warms up
                    times[label].append((spent[0], time.perf_counter() - start))
    return times


def _timed(function, spent: List[float], device):
    """``function`` as an attention function that adds the seconds it takes to ``spent[0]``."""
    def run(q, k, v, layout, layer_index):
        _sync(device)
        start = time.perf_counter()
        out = function(q, k, v, layout, layer_index)
        _sync(device)
        spent[0] += time.perf_counter() - start
        return out
    return run


def time_runs(model, setup: QualitySetup, size: int, measured: List[Variant], progress=None
              ) -> Tuple[Dict[str, List[Tuple[float, float]]], Dict[str, torch.Tensor], Dict[str, float]]:
    """Whole sampling runs: label -> [(attention seconds, run seconds) per round] for the exact run (label EXACT)
    and every variant, rounds interleaved with the order rotating; each variant's images (from its last round)
    and what its refresh mode kept at the end of the run (MiB). One attention function per variant for all its
    rounds, each round a new sampling run, as the node keeps its caches per device across runs: the first round
    pays the refresh mode's sizing step (its first step exact), later rounds of the same size know the sizes."""
    device = next(model.parameters()).device
    makers = {EXACT: lambda: (lambda q, k, v, layout, layer_index: F.scaled_dot_product_attention(q, k, v))}
    makers.update((variant.label, variant.attention_fn) for variant in measured)
    functions = {label: maker() for label, maker in makers.items()}
    times: Dict[str, List[Tuple[float, float]]] = {label: [] for label in makers}
    images: Dict[str, torch.Tensor] = {}
    kept: Dict[str, float] = {}
    labels_in_order = list(makers)
    for round_index in range(setup.repeats):
        shift = round_index % len(labels_in_order)
        for label in labels_in_order[shift:] + labels_in_order[:shift]:
            if progress is not None:
                progress(f"whole runs: {label} ({round_index + 1}/{setup.repeats})")
            function, spent = functions[label], [0.0]
            if hasattr(function, "new_run"):
                function.new_run()

            timed = _timed(function, spent, device)
            _sync(device)
            start = time.perf_counter()
            result = sample(model, setup, size, timed)
            _sync(device)
            times[label].append((spent[0], time.perf_counter() - start))
            images[label] = result
            if hasattr(function, "cache"):
                kept[label] = function.cache.kept_bytes / float(1 << 20)
    return times, images, kept


@dataclass(frozen=True)
class Speedup:
    """Exact time / backend time over interleaved rounds: the median of the rounds' ratios, lowest, highest."""

    median: float
    low: float
    high: float
    rounds: int

    @classmethod
    def of_rounds(cls, exact: Sequence[float], backend: Sequence[float]) -> "Speedup":
        ratios = [e / b for e, b in zip(exact, backend)]
        return cls(statistics.median(ratios), min(ratios), max(ratios), len(ratios))

    @property
    def noise(self) -> float:
        """Half the spread of the rounds, relative to the median (0 with one round)."""
        return (self.high - self.low) / 2 / self.median


def speedups(timings: Dict[str, List[Tuple[float, float]]], label: str) -> Tuple[Speedup, Speedup]:
    """(attention, denoiser) speedup of ``label`` against EXACT, round by round."""
    exact, rounds = timings[EXACT], timings[label]
    return (Speedup.of_rounds([a for a, _ in exact], [a for a, _ in rounds]),
            Speedup.of_rounds([d for _, d in exact], [d for _, d in rounds]))


NOISY = 0.25  # rounds spreading by more than +-25% (median over the rows): the speed columns say little


def timing_warnings(size: int, measured: Dict[str, Tuple[Speedup, Speedup]]) -> List[str]:
    """Warnings on the timings of one size: ``sdpa`` runs what EXACT runs, so its speedup should be 1; when it
    strays from 1 by more than the noise measured (its own spread, and at least the median spread of the rows
    of this size) the load on the machine changed during the run and the speed columns of that size mislead; when
    the rounds spread by more than NOISY, they say little either way."""
    if "sdpa" not in measured:
        return []
    rounds = measured["sdpa"][0].rounds
    if rounds < 2:
        return [f"warning: {size} px: one timing round, so no spread was measured and nothing checks the speed "
                f"columns; use --repeats 3 or more"]
    warnings = []
    for index, what in enumerate(("attention", "denoiser")):
        own = measured["sdpa"][index]
        typical = statistics.median(pair[index].noise for pair in measured.values())
        noise = max(own.noise, typical)
        if typical > NOISY:
            warnings.append(
                f"warning: {size} px: the {what} timing rounds spread by +-{typical:.0%} (median over the rows; sdpa, "
                f"which should measure 1, ranged {own.low:.2f} to {own.high:.2f}), so this size's {what} speedups "
                f"say little: the machine is busy; rerun on an idle machine or with more --repeats")
        elif abs(own.median - 1) > noise:
            warnings.append(
                f"warning: {size} px: sdpa, the same computation as the exact reference, measured {what} speedup "
                f"{own.median:.2f} (rounds {own.low:.2f} to {own.high:.2f}), off 1 by more than the timing noise "
                f"measured (+-{noise:.0%}): the machine's load changed during the run, so this size's speed "
                f"columns are not to be trusted; rerun on an idle machine or with more --repeats")
    return warnings


def serves_proxy(model, variant: Variant, size: int, frames: int = 1) -> List[str]:
    """Why ``variant`` cannot serve the proxy's attention calls at ``size`` (empty when it can)."""
    config = model.config
    grid = size // config.patch
    layout = TokenLayout(frames, grid, grid, before=config.cond_tokens)
    tokens = layout.before + layout.image_tokens
    q = torch.zeros(1, config.heads, tokens, config.head_dim, device=next(model.parameters()).device)
    return why_not(variant.backend, q, q, q, config.heads, skip_reshape=True, layout=layout, **dict(variant.options))


def run(model, sizes: Sequence[int], setup: QualitySetup, backends: Optional[Sequence[str]] = None,
        max_errors: Sequence[float] = (), progress=sys.stderr, refreshes: Sequence[int] = (),
        reuses: Sequence[str] = ("residual",), options: Optional[Sequence[Dict[str, object]]] = None,
        save: Optional[str] = None) -> Tuple[List[QualityRow], List[str]]:
    """The quality table: one row per size and variant (``options``: only these option sets); and notes on what
    was left out. Rows with the refresh mode (``refreshes``) are timed over whole sampling runs. ``save``: a folder
    that gets one picture per size (save_picture)."""
    measured_all, notes = variants(backends, max_errors, refreshes, reuses, options)
    frames = setup.frames or 1
    rows: List[QualityRow] = []
    started = time.perf_counter()
    for size_index, size in enumerate(sizes, 1):
        measured = []
        for variant in measured_all:
            reasons = serves_proxy(model, variant, size, frames)
            if reasons:
                notes.append(f"{variant.label} at {size} px: not measured ({'; '.join(reasons)})")
            else:
                measured.append(variant)

        def report(what, size_index=size_index, size=size):
            _progress(progress, f"[{size_index}/{len(sizes)}] {size} px: {what}", started)

        report("exact images and attention errors along their trajectory")
        exact_images, errors = exact_trajectory(model, setup, size, measured)
        report("timing")
        per_call = [variant for variant in measured if not variant.refresh]
        whole = [variant for variant in measured if variant.refresh]
        timings = time_denoiser(model, setup, size, per_call, report)
        measured_speedups = {variant.label: speedups(timings, variant.label) for variant in per_call}
        notes.extend(timing_warnings(size, measured_speedups))
        run_images, kept = {}, {}
        if whole:  # the refresh mode's cost differs from step to step: whole sampling runs against the exact run
            run_timings, run_images, kept = time_runs(model, setup, size, whole, report)
            measured_speedups.update((variant.label, speedups(run_timings, variant.label)) for variant in whole)
        tokens = model.config.cond_tokens + frames * (size // model.config.patch) ** 2
        pictured = [("exact", exact_images)]
        for variant in measured:
            if variant.label in run_images:
                images = run_images[variant.label]
            else:
                report(f"sampling with {variant.label}")
                images = sample(model, setup, size, variant.attention_fn())
            attention_speedup, denoiser_speedup = measured_speedups[variant.label]
            mean_cosine, mean_rel_l2 = errors.mean(variant.label)
            whole_run = {}
            if variant.refresh:
                whole_run = dict(refresh=variant.refresh, reuse=variant.reuse,
                                 run_attention_speedup=attention_speedup.median,
                                 run_denoiser_speedup=denoiser_speedup.median,
                                 run_attention_speedup_range=(attention_speedup.low, attention_speedup.high),
                                 run_denoiser_speedup_range=(denoiser_speedup.low, denoiser_speedup.high),
                                 cache_mib=kept.get(variant.label, 0.0))
            if setup.frames:
                whole_run.update(frames=frames, motion=float(motion_ratio(images, exact_images).mean()),
                                 temporal_error=float(temporal_error(images, exact_images).mean()))
            per_image = (frames_as_images(images), frames_as_images(exact_images)) if setup.frames else (images, exact_images)
            rows.append(QualityRow(
                variant.backend, dict(variant.options), BACKENDS[variant.backend].exact, variant.max_error, size, tokens,
                attention_speedup.median, denoiser_speedup.median,
                (attention_speedup.low, attention_speedup.high), (denoiser_speedup.low, denoiser_speedup.high),
                attention_speedup.rounds, float(psnr_db(*per_image).mean()), float(ssim(*per_image).mean()),
                mean_cosine, mean_rel_l2, **whole_run))
            row = rows[-1]
            motion = f", motion {row.motion:.2f}" if row.motion is not None else ""
            pictured.append((f"{variant.label}: {row.psnr_db:.1f} dB{motion}, attention {row.attention_speedup:.2f}x, "
                             f"denoiser {row.denoiser_speedup:.2f}x", images))
        if save:
            name = f"quality_{frames}x{size}px.png" if setup.frames else f"quality_{size}px.png"
            notes.append(f"picture: {save_picture(pictured, os.path.join(save, name))}")
    _progress(progress, None, started)
    return rows, notes


PICTURED_FRAMES = 4  # a video's row shows this many of its frames, first to last, for each video


def save_picture(rows: Sequence[Tuple[str, torch.Tensor]], path: str) -> str:
    """A PNG: one row of images per (label, (B, 3, H, W) images in [0, 1]), the label above it; returns the path.
    Videos (B, 3, F, H, W) show PICTURED_FRAMES frames of each video, evenly spaced from the first to the last."""
    from PIL import Image, ImageDraw

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if rows[0][1].ndim == 5:
        frames = rows[0][1].shape[2]
        chosen = torch.linspace(0, frames - 1, min(PICTURED_FRAMES, frames)).round().long()
        rows = [(label, frames_as_images(videos[:, :, chosen])) for label, videos in rows]
    batch, _, height, width = rows[0][1].shape
    zoom = max(1, 128 // height)
    label_height, row_height = 14, height * zoom + 14
    picture = Image.new("RGB", (max(batch * width * zoom, 560), len(rows) * row_height), "white")
    draw = ImageDraw.Draw(picture)
    for index, (label, images) in enumerate(rows):
        top = index * row_height
        draw.text((2, top + 1), label, fill="black")
        strip = (images.clamp(0, 1).permute(2, 0, 3, 1).reshape(height, batch * width, 3) * 255).round().byte().numpy()
        tile = Image.fromarray(strip).resize((batch * width * zoom, height * zoom), Image.NEAREST)
        picture.paste(tile, (0, top + label_height))
    picture.save(path)
    return path


def _progress(stream, line: Optional[str], started: float) -> None:
    """One line rewritten in place on a terminal, one line per step elsewhere; None clears it."""
    if stream is None:
        return
    if line is None:
        if stream.isatty():
            stream.write("\r" + " " * 110 + "\r")
            stream.flush()
        return
    text = f"{line} ({time.perf_counter() - started:.0f} s)"
    stream.write(f"\r{text[:110]:110s}" if stream.isatty() else text + "\n")
    stream.flush()


def format_table(rows: List[QualityRow]) -> str:
    """The rows as a Markdown table; with videos, also each row's frames, motion and temporal error."""
    header = ["backend", "options", "px", "tokens", "attn speedup", "(rounds)", "denoiser speedup", "(rounds)",
              "PSNR dB", "SSIM", "attn cosine", "attn rel L2"]
    video = any(row.frames > 1 for row in rows)
    if video:
        header[2:3] = ["frames", "px"]
        header += ["motion", "temporal err"]
    return markdown_table(header, [[
        row.backend + ("" if not row.exact else " (exact)"),
        " ".join([f"{k}={v}" for k, v in row.options.items()]
                 + [f"refresh={row.refresh}" + (f" reuse={row.reuse}" if row.reuse != "residual" else "")
                    + (f" (whole runs, cache {row.cache_mib:.1f} MiB)" if row.cache_mib is not None else "")] * bool(row.refresh)
                 + [f"max_error={row.max_error:g}"] * bool(row.max_error))
        or "-"] + [str(row.frames)] * video + [str(row.image_size), str(row.tokens),
        f"{row.attention_speedup:.2f}", "{:.2f}-{:.2f}".format(*row.attention_speedup_range),
        f"{row.denoiser_speedup:.2f}", "{:.2f}-{:.2f}".format(*row.denoiser_speedup_range),
        f"{row.psnr_db:.2f}", f"{row.ssim:.4f}",
        f"{row.attn_cosine:.4f}", f"{row.attn_rel_l2:.4f}"]
        + ([f"{row.motion:.3f}", f"{row.temporal_error:.3f}"] if video else []) for row in rows])


def rows_as_json(rows: List[QualityRow]) -> List[dict]:
    return [asdict(row) for row in rows]
