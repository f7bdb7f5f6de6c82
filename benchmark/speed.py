"""Benchmark: every available backend on diffusion-shaped attention, side by side with torch SDPA.

For each workload the backends run interleaved (one call each per round, in rotating order), so each is
compared with torch SDPA under the same machine load. Columns: median ms; speedup = torch SDPA's median time /
the backend's median time on the same inputs and mask (higher is faster, 1 = as fast as torch SDPA); peak
memory above the inputs; max abs error and cosine similarity against exact attention (torch SDPA in fp32).
"""
from __future__ import annotations

import ctypes
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from ..attention import BACKENDS, RegionMask, TokenLayout, attention, why_not
from ..attention.heads import merge_heads
from .table import markdown_table

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


@dataclass(frozen=True)
class Workload:
    """One attention call shape: q (B, N, H*D), k/v (B, M, H*D)."""

    name: str
    batch: int
    n: int
    m: int
    heads: int
    dim: int
    text_tokens: int = 0  # joint attention: this many leading text tokens (label -1) in q and k
    cross: bool = False  # cross-attention: keys are text tokens

    def describe(self) -> str:
        return f"B={self.batch} N={self.n} M={self.m} H={self.heads} D={self.dim}"

    @property
    def layout(self) -> Optional[TokenLayout]:
        """Self/joint attention: the text tokens, then a square image grid (None for cross-attention)."""
        if self.cross:
            return None
        side = int(round((self.n - self.text_tokens) ** 0.5))
        return TokenLayout(1, side, side, before=self.text_tokens)


PRESETS: Dict[str, Workload] = {w.name: w for w in [
    Workload("sd15-512-self", 2, 4096, 4096, 8, 40),
    Workload("sd15-512-cross", 2, 4096, 77, 8, 40, cross=True),
    Workload("sd15-512x1024-self", 2, 8192, 8192, 8, 40),
    Workload("sd15-1024-self", 2, 16384, 16384, 8, 40),
    Workload("sdxl-1024-self", 2, 4096, 4096, 10, 64),
    Workload("flux-1024-joint", 1, 4608, 4608, 24, 128, text_tokens=512),
    Workload("sdxl-2048-self", 2, 16384, 16384, 10, 64),
    Workload("flux-2048-joint", 1, 16896, 16896, 24, 128, text_tokens=512),
]}
QUICK_PRESETS = ["sd15-512-self", "sd15-512-cross"]
MEMORY_REFERENCE = "comfy naive"  # full score matrix, as ComfyUI's attention_basic; timed once

# Published peak numbers (dense fp16/bf16 tensor-core TFLOP/s, memory GB/s) for the GPUs people use most.
DEVICE_PEAKS = {"H200": (989.0, 4800.0), "H100": (989.0, 3350.0), "A100": (312.0, 2039.0),
                "L40S": (362.0, 864.0), "RTX 4090": (165.2, 1008.0), "RTX 3090": (71.0, 936.0)}


def build_inputs(workload: Workload, dtype, device, masked: bool, seed: int = 0):
    """q, k, v in ComfyUI layout, and the masks of the masked variant.

    Self/joint attention: "isolate regions" with the left and right image halves as regions (text
    tokens of joint attention are label -1, attending and attended everywhere), given both as a
    RegionMask and as the equivalent dense (B, N, M) boolean mask. Cross attention: a (B, 1, M)
    key-padding mask hiding the last 20 text tokens.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    b, n, m, h, d = workload.batch, workload.n, workload.m, workload.heads, workload.dim
    q, k, v = (torch.randn(b, tokens, h * d, generator=gen).to(device=device, dtype=dtype)
               for tokens in (n, m, m))
    if not masked:
        return q, k, v, None, None
    if workload.cross:
        padding = torch.ones(b, 1, m, dtype=torch.bool, device=device)
        padding[:, :, max(1, m - 20):] = False
        return q, k, v, padding, padding
    image_tokens = n - workload.text_tokens
    side = int(round(image_tokens ** 0.5))
    columns = torch.arange(image_tokens, device=device) % side
    image_labels = (columns >= side // 2).long()
    labels = torch.cat([torch.full((workload.text_tokens,), -1, device=device), image_labels])[None].expand(b, -1)
    region = RegionMask(labels, labels)
    return q, k, v, region, region.to_dense()[:, 0]


def torch_sdpa(q, k, v, heads, mask=None):
    """What ComfyUI's own attention_pytorch does: split heads, torch SDPA, merge heads."""
    b, n, c = q.shape
    d = c // heads
    qh, kh, vh = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    if mask is not None and mask.ndim == 3:
        mask = mask[:, None]
    if q.device.type == "cpu" and q.dtype != torch.float32:  # no fast half matmul on CPU: fp32, cast back
        qh, kh, vh = qh.float(), kh.float(), vh.float()
    return merge_heads(F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)).to(q.dtype)


def comfy_naive(q, k, v, heads, mask=None):
    """ComfyUI-style attention_basic: the full (B*H, N, M) fp32 score matrix."""
    b, n, c = q.shape
    d = c // heads
    qh, kh, vh = (t.reshape(b, -1, heads, d).permute(0, 2, 1, 3).reshape(b * heads, -1, d).float() for t in (q, k, v))
    scores = torch.bmm(qh, kh.transpose(1, 2)) * d ** -0.5
    if mask is not None:
        full = mask if mask.ndim == 3 else mask[None]
        scores.view(b, heads, n, -1).masked_fill_(~full[:, None], float("-inf"))
    out = torch.bmm(scores.softmax(-1), vh)
    return out.view(b, heads, n, -1).permute(0, 2, 1, 3).reshape(b, n, -1).to(q.dtype)


class PeakMemory:
    """Peak memory of one call above what was allocated before it.

    CUDA: torch's allocator statistics. CPU: resident set size sampled every 0.5 ms on a side thread.
    During that one call glibc serves every allocation above 64 KiB by mmap, so that freed memory leaves
    the process at once and an earlier call's freed pages cannot hide this call's; afterwards the
    thresholds go back to where glibc's own adjustment settles (32 MiB mmap, 64 MiB trim), so the
    timing rounds are not slowed by it.
    """

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3

    def __init__(self, device: torch.device):
        self.device = device
        self.libc = None
        if device.type == "cpu":
            try:
                self.libc = ctypes.CDLL("libc.so.6")
            except OSError:  # not glibc: the RSS reading is then an upper bound on reuse
                pass

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096

    def _malloc_thresholds(self, mmap_bytes: int, trim_bytes: int) -> None:
        if self.libc is not None:
            self.libc.mallopt(self.M_MMAP_THRESHOLD, mmap_bytes)
            self.libc.mallopt(self.M_TRIM_THRESHOLD, trim_bytes)
            self.libc.malloc_trim(0)

    def measure(self, fn: Callable[[], object]) -> float:
        """Run fn once; return its peak extra memory in MiB."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - before) / 2**20
        self._malloc_thresholds(64 << 10, 128 << 10)
        before = self._rss()
        peak = [before]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], self._rss())
                time.sleep(0.0005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            fn()
        finally:
            done.set()
            sampler.join()
            self._malloc_thresholds(32 << 20, 64 << 20)
        return max(0, peak[0] - before) / 2**20


@dataclass
class Row:
    workload: str
    variant: str
    backend: str
    median_ms: float
    speedup: float  # torch SDPA's median time / this row's median time: higher is faster
    peak_mib: float
    max_abs_err: float
    cosine: float
    throughput: str = ""


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _candidates(workload: Workload, q, k, v, region, dense, include_naive: bool, backends: Optional[List[str]]):
    """(label, fn) for torch SDPA and every backend (of ``backends``, default all) that can serve this
    workload here, with each mask form."""
    h = workload.heads
    yield "torch SDPA", lambda: torch_sdpa(q, k, v, h, dense)
    mask_forms = [dense] if region is dense else [dense, region]
    layout = workload.layout
    for name in backends or BACKENDS:
        if BACKENDS[name].slow_reason():
            continue
        for options in BACKENDS[name].benchmark_options:
            for mask in mask_forms:
                if why_not(name, q, k, v, h, mask, layout=layout, **options):
                    continue
                label = " ".join([name] + [f"{key}={value}" for key, value in options.items()])
                label += "[region]" if isinstance(mask, RegionMask) else ""
                yield label, (lambda name=name, mask=mask, options=options:
                              attention(q, k, v, h, mask, backend=name, layout=layout, **options))
    if include_naive:
        yield MEMORY_REFERENCE, lambda: comfy_naive(q, k, v, h, dense)


def _throughput(label: str, workload: Workload, dtype, seconds: float, allowed_fraction: float) -> str:
    """GB/s for linear backends (bytes of q, k, v and out), TFLOP/s for exact ones (allowed pairs only)."""
    b, n, m, h, d = workload.batch, workload.n, workload.m, workload.heads, workload.dim
    backend = BACKENDS.get(label.split()[0].split("[")[0])
    if backend is not None and not backend.exact and not label.startswith("linear"):
        return "-"  # todo, agent: their work is not the N x M of exact attention
    if label.startswith("linear"):
        size = torch.tensor([], dtype=dtype).element_size()
        return f"{(b * (2 * n + 2 * m) * h * d * size) / seconds / 1e9:.0f} GB/s"
    return f"{4 * b * h * n * m * d * allowed_fraction / seconds / 1e12:.2f} TFLOP/s"


def run(workloads: List[Workload], dtype=torch.float32, device="cpu", repeats: int = 5, warmup: int = 1,
        masks=("none", "mask"), backends: Optional[List[str]] = None, progress=sys.stderr) -> List[Row]:
    """Benchmark ``backends`` (default: all, plus the ComfyUI-style naive attention as a memory reference)."""
    device = torch.device(device)
    memory = PeakMemory(device)
    rows: List[Row] = []
    jobs = [(w, variant) for w in workloads for variant in masks]
    for index, (workload, variant) in enumerate(jobs, 1):
        q, k, v, region, dense = build_inputs(workload, dtype, device, variant == "mask")
        include_naive = backends is None and workload.batch * workload.heads * workload.n * workload.m * 4 <= 2**31
        candidates = dict(_candidates(workload, q, k, v, region, dense, include_naive, backends))
        exact = torch_sdpa(q.float(), k.float(), v.float(), workload.heads, dense)
        allowed_fraction = 1.0 if dense is None else float(dense.float().mean())
        times: Dict[str, List[float]] = {label: [] for label in candidates}
        peaks: Dict[str, float] = {}
        errors: Dict[str, tuple] = {}
        labels = list(candidates)
        for label in labels:  # warm-up, accuracy and memory, one backend at a time
            _progress(progress, index, len(jobs), workload, variant, f"{label}: warm-up")
            for _ in range(0 if label == MEMORY_REFERENCE else warmup):
                candidates[label]()
            _sync(device)
            result = {}
            started = time.perf_counter()
            peaks[label] = memory.measure(lambda: result.setdefault("out", candidates[label]()))
            if label == MEMORY_REFERENCE:  # run once: a memory reference, not a speed contender
                times[label].append(time.perf_counter() - started)
            out = result["out"].float()
            cosine = F.cosine_similarity(out.flatten().double(), exact.flatten().double(), dim=0).item()
            errors[label] = ((out - exact).abs().max().item(), cosine)
            del result, out
        timed = [label for label in labels if label != MEMORY_REFERENCE]
        for rep in range(repeats):  # interleaved timing rounds, rotating the order
            order = timed[rep % len(timed):] + timed[:rep % len(timed)]
            for label in order:
                _progress(progress, index, len(jobs), workload, variant, f"round {rep + 1}/{repeats} {label}")
                _sync(device)
                start = time.perf_counter()
                candidates[label]()
                _sync(device)
                times[label].append(time.perf_counter() - start)
        baseline = statistics.median(times["torch SDPA"])
        for label in labels:
            median = statistics.median(times[label])
            rows.append(Row(workload.name, variant, label, median * 1e3, baseline / median, peaks[label],
                            errors[label][0], errors[label][1],
                            _throughput(label, workload, dtype, median, allowed_fraction)))
        del q, k, v, region, dense, exact, candidates
    if progress is not None and progress.isatty():
        progress.write("\r" + " " * 100 + "\r")
        progress.flush()
    return rows


def _progress(stream, index, total, workload, variant, what):
    """One line rewritten in place on a terminal; elsewhere (a log) one line per workload."""
    if stream is None:
        return
    line = f"[{index}/{total}] {workload.name} ({variant})"
    if stream.isatty():
        stream.write(f"\r{line} {what}".ljust(100)[:100])
    elif what.endswith("warm-up") and what.startswith("torch SDPA"):
        stream.write(line + "\n")
    stream.flush()


def format_table(rows: List[Row], device: str) -> str:
    header = ["workload", "mask", "backend", "median ms", "speedup", "peak MiB", "max abs err", "cosine"]
    show_throughput = device.startswith("cuda")
    if show_throughput:
        header.append("throughput")
    lines = []
    for r in rows:
        line = [r.workload, r.variant, r.backend, f"{r.median_ms:.2f}", f"{r.speedup:.3f}", f"{r.peak_mib:.1f}",
                f"{r.max_abs_err:.2e}", f"{r.cosine:.5f}"]
        if show_throughput:
            line.append(r.throughput)
        lines.append(line)
    return markdown_table(header, lines)


def device_peak_line(device: str) -> Optional[str]:
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, (tflops, gbps) in DEVICE_PEAKS.items():
        if key in name:
            return f"{name}: peak {tflops:.0f} TFLOP/s (dense fp16/bf16), {gbps:.0f} GB/s"
    return f"{name}: peak numbers unknown to this table"
