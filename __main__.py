"""Command line: ``python -m efficient_attention_pop bench|info`` (also the ``efficient-attention-pop`` script)."""
from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def info(_args) -> int:
    from .attention import AUTO_PRIORITY, BACKENDS, availability

    device = f"cuda ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "cpu only (no CUDA device)"
    print(f"python {platform.python_version()}, torch {torch.__version__}, triton {_triton_version()}")
    print(f"device: {device}; CPU threads: {torch.get_num_threads()}")
    print(f"auto tries, in order: {', '.join(AUTO_PRIORITY)}")
    for name, reason in availability().items():
        backend = BACKENDS[name]
        state = "available" if reason is None else f"not available: {reason}"
        print(f"  {name:14s} {state}\n  {'':14s} {backend.description}")
    return 0


def bench(args) -> int:
    from .benchmark.speed import PRESETS, QUICK_PRESETS, device_peak_line, format_table, run

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    names = args.presets or (QUICK_PRESETS if args.quick else list(PRESETS))
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        print(f"error: unknown preset(s) {unknown}; choose from {list(PRESETS)}", file=sys.stderr)
        return 2
    from .attention import BACKENDS

    unknown = [b for b in args.backends or [] if b not in BACKENDS]
    if unknown:
        print(f"error: unknown backend(s) {unknown}; choose from {list(BACKENDS)}", file=sys.stderr)
        return 2
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
    masks = {"both": ("none", "mask"), "none": ("none",), "mask": ("mask",)}[args.mask]
    print(f"efficient_attention_pop bench: device={args.device} dtype={args.dtype} repeats={repeats} "
          f"torch {torch.__version__} threads={torch.get_num_threads()}")
    peak = device_peak_line(args.device)
    if peak:
        print(peak)
    started = time.perf_counter()
    rows = run([PRESETS[n] for n in names], DTYPES[args.dtype], args.device, repeats=repeats, masks=masks,
               backends=args.backends)
    for name in names:
        print(f"{name}: {PRESETS[name].describe()}")
    print(format_table(rows, args.device))
    print(f"ratio = median time / median time of torch SDPA on the same inputs and mask, measured interleaved "
          f"in this run; total {time.perf_counter() - started:.1f} s")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="efficient-attention-pop",
                                     description="Efficient Attention (PoP): benchmark and environment report")
    sub = parser.add_subparsers(dest="command", required=True)
    bench_parser = sub.add_parser("bench", help="time every available backend on diffusion-shaped attention")
    bench_parser.add_argument("--preset", dest="presets", action="append",
                              help="workload preset (repeatable); default: all, or the quick set with --quick")
    bench_parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    bench_parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bench_parser.add_argument("--repeats", type=int, default=None, help="timed rounds per workload (default 5, 3 quick)")
    bench_parser.add_argument("--backend", dest="backends", action="append",
                              help="backend to compare with torch SDPA (repeatable); default: every available one "
                                   "plus ComfyUI-style naive attention as a memory reference")
    bench_parser.add_argument("--mask", choices=["both", "none", "mask"], default="both",
                              help="run each workload without a mask, with one, or both")
    bench_parser.add_argument("--quick", action="store_true", help="SD1.5 512px presets only; under a minute on 2 cores")
    bench_parser.set_defaults(func=bench)
    info_parser = sub.add_parser("info", help="versions, device, and which backends are available here")
    info_parser.set_defaults(func=info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
