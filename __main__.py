"""Command line: ``python -m efficient_attention_pop bench|quality|gpu-report|info`` (also the ``efficient-attention-pop`` script)."""
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


def quality(args) -> int:
    import json

    from .benchmark.quality import DEFAULT_SIZES, QUICK, QUICK_SIZES, QualitySetup, format_table, rows_as_json, run

    if args.comfyui_model:
        from .benchmark.comfy_quality import run_on_comfyui_model

        args.steps = args.steps or 4
        return run_on_comfyui_model(args)
    from .attention import BACKENDS

    unknown = [b for b in args.backends or [] if b not in BACKENDS]
    if unknown:
        print(f"error: unknown backend(s) {unknown}; choose from {list(BACKENDS)}", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    from .benchmark.proxy import load_proxy_model

    setup = QUICK if args.quick else QualitySetup()
    setup = QualitySetup(setup.classes, args.steps or setup.steps, setup.seed, setup.guidance,
                         setup.repeats if args.repeats is None else args.repeats)
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    model = load_proxy_model(args.device)
    print(f"efficient_attention_pop quality: proxy DiT ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
          f"parameters, trained at 32 px), {len(setup.classes)} images, {setup.steps} steps, guidance "
          f"{setup.guidance}, sizes {list(sizes)} px, device={args.device}, torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}")
    started = time.perf_counter()
    rows, notes = run(model, sizes, setup, args.backends, args.max_errors or ())
    print(format_table(rows))
    for note in notes:
        print(f"note: {note}")
    print(f"speedup = exact time / backend time of one guided denoiser call at t=0.5, attention calls and whole "
          f"denoiser, median of {setup.repeats} interleaved rounds; PSNR/SSIM: final images vs the exact images "
          f"from the same noise; attn cosine / rel L2: mean over layers along the exact trajectory; total "
          f"{time.perf_counter() - started:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows_as_json(rows), f, indent=1)
    return 0


def gpu_report(args) -> int:
    from .benchmark.gpu_report import run_report

    return run_report(args)


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
    quality_parser = sub.add_parser(
        "quality", help="how far each backend moves the images of a trained model, beside its speed")
    quality_parser.add_argument("--quick", action="store_true",
                                help="2 images, 8 steps, 32 and 64 px, one timing round (under 3 min on 2 cores)")
    quality_parser.add_argument("--size", dest="sizes", type=int, action="append",
                                help="image size in pixels (repeatable); default 32, 64 and 128 (1x, 4x, 16x the "
                                     "training token count)")
    quality_parser.add_argument("--backend", dest="backends", action="append",
                                help="measure only this backend (repeatable); default every backend")
    quality_parser.add_argument("--repeats", type=int, default=None, help="timing rounds (default 3, 1 quick)")
    quality_parser.add_argument("--steps", type=int, default=None,
                                help="sampling steps (default 12, 8 quick; 4 with --comfyui-model)")
    quality_parser.add_argument("--max-error", dest="max_errors", type=float, action="append",
                                help="also measure every approximate backend under the node's quality guard with this "
                                     "bound (repeatable)")
    quality_parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    quality_parser.add_argument("--json", help="also write the rows to this file, one JSON object per row")
    quality_parser.add_argument("--comfyui-model", metavar="FILE",
                                help="measure a diffusion model file of your own instead, loaded by ComfyUI "
                                     "(needs ComfyUI importable: run inside ComfyUI's Python or set COMFYUI_PATH)")
    quality_parser.set_defaults(func=quality)
    from .benchmark.gpu_report import add_arguments as gpu_report_arguments

    report_parser = sub.add_parser(
        "gpu-report", help="tests on the device, bench in bf16/fp16 and quality, each stage time-limited, in one "
                           "Markdown report (--device cpu checks it without a GPU)")
    gpu_report_arguments(report_parser, "cuda" if torch.cuda.is_available() else "cpu")
    report_parser.set_defaults(func=gpu_report)
    info_parser = sub.add_parser("info", help="versions, device, and which backends are available here")
    info_parser.set_defaults(func=info)
    args = parser.parse_args(argv)
    args.argv = ["python -m efficient_attention_pop"] + list(sys.argv[1:] if argv is None else argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
