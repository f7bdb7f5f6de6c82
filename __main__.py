"""Command line: ``python -m efficient_attention_pop bench|quality|gpu-report|info`` (also the ``efficient-attention-pop`` script)."""
from __future__ import annotations

import argparse
import platform
import sys
import time

import torch


def info(_args) -> int:
    from .attention import AUTO_PRIORITY, BACKENDS, availability
    from .benchmark.speed import triton_version

    device = f"cuda ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "cpu only (no CUDA device)"
    print(f"python {platform.python_version()}, torch {torch.__version__}, triton {triton_version()}")
    print(f"device: {device}; CPU threads: {torch.get_num_threads()}")
    print(f"auto tries, in order: {', '.join(AUTO_PRIORITY)} (exact backends only)")
    reasons = availability()
    offered = [name for name, backend in BACKENDS.items() if backend.not_in_node is None and reasons[name] is None]
    print(f"the ComfyUI node offers here: auto, {', '.join(offered)}")
    for name, reason in reasons.items():
        backend = BACKENDS[name]
        state = "available here" if reason is None else f"not available here: {reason}"
        if backend.not_in_node:
            node = f"library only, not in the node: {backend.not_in_node}"
        elif reason is None:
            node = "in the node"
        else:
            node = "in the node where it is available"
        print(f"  {name:14s} {state}; {node}\n  {'':14s} {backend.description}")
    return 0


def bench(args) -> int:
    from .benchmark.speed import DTYPES, PRESETS, QUICK_PRESETS, device_peak_line, format_table, run

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
    print(f"speedup = torch SDPA's median time / the backend's median time on the same inputs and mask (higher is "
          f"faster; 1 = as fast as torch SDPA), rounds interleaved in this run; total "
          f"{time.perf_counter() - started:.1f} s")
    return 0


def quality(args) -> int:
    import json

    from .benchmark.quality import (DEFAULT_SIZES, QUICK, QUICK_SIZES, VIDEO, VIDEO_SIZES, QualitySetup, format_table,
                                    rows_as_json, run)

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
    from .benchmark.proxy import VIDEO_WEIGHTS, load_proxy_model

    if args.frames is not None and not args.video:
        print("error: --frames needs --video", file=sys.stderr)
        return 2
    setup = VIDEO if args.video else QUICK if args.quick else QualitySetup()
    classes = setup.classes[:1] if args.video and args.quick else setup.classes
    setup = QualitySetup(classes, args.steps or setup.steps, setup.seed, setup.guidance,
                         setup.repeats if args.repeats is None else args.repeats, args.frames or setup.frames)
    sizes = args.sizes or (VIDEO_SIZES if args.video else QUICK_SIZES if args.quick else DEFAULT_SIZES)
    model = load_proxy_model(args.device, weights=VIDEO_WEIGHTS) if args.video else load_proxy_model(args.device)
    name, trained, samples = (("video proxy DiT", "trained on 4 to 8 frames of 32 px", f"videos of {setup.frames} frames")
                              if args.video else ("proxy DiT", "trained at 32 px", "images"))
    print(f"efficient_attention_pop quality: {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
          f"parameters, {trained}), {len(setup.classes)} {samples}, {setup.steps} steps, guidance {setup.guidance}, "
          f"sizes {list(sizes)} px, device={args.device}, torch {torch.__version__}, threads={torch.get_num_threads()}")
    started = time.perf_counter()
    options = None
    if args.options:
        try:
            options = [{name: _option_value(value) for name, value in (item.split("=") for item in chosen.split(","))}
                       for chosen in args.options]
        except ValueError:
            print(f"error: --options takes name=value[,name=value] with integer values; got {args.options}",
                  file=sys.stderr)
            return 2
    rows, notes = run(model, sizes, setup, args.backends, args.max_errors or (), refreshes=args.refreshes or (),
                      reuses=args.reuses or ("residual",), options=options, save=args.save)
    print(format_table(rows))
    for note in notes:
        print(note if note.startswith("warning:") else f"note: {note}")
    print(f"speedup = exact time / backend time of one guided denoiser call at t=0.5 (higher is faster), attention "
          f"calls and whole denoiser: the median of {setup.repeats} interleaved rounds' ratios, (rounds) the lowest "
          f"and highest; PSNR/SSIM: final images vs the exact images from the same noise; attn cosine / rel L2: mean "
          f"over layers along the exact trajectory; total {time.perf_counter() - started:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows_as_json(rows), f, indent=1)
    return 0


def _option_value(text: str):
    """An --options value: true/false as booleans, else an integer (ValueError otherwise)."""
    lowered = text.lower()
    return lowered == "true" if lowered in ("true", "false") else int(text)


def regional_speed(args) -> int:
    from .benchmark.regional_speed import FLUX_SHAPED, format_rows, run

    print(f"efficient_attention_pop regional-speed: models {args.models}, regions {args.regions}, {args.steps} euler "
          f"steps, {args.repeats} interleaved rounds after a warm-up, random weights (Flux-shaped: hidden "
          f"{FLUX_SHAPED['hidden_size']}, {FLUX_SHAPED['depth']} double + {FLUX_SHAPED['depth_single_blocks']} single "
          f"blocks), torch {torch.__version__}, threads={torch.get_num_threads()}")
    started = time.perf_counter()
    rows = run(args.models, args.regions, args.steps, args.repeats, args.isolation,
               log=lambda line: print(line, file=sys.stderr))
    print(format_rows(rows))
    print(f"speedup = ComfyUI's masked conditioning (one evaluation per prompt and step) / one pass, whole sampling "
          f"runs, median of the rounds' ratios (lowest-highest); total {time.perf_counter() - started:.1f} s")
    return 0


def regional_accuracy(args) -> int:
    from .benchmark.regional_accuracy import DEFAULTS, format_rows, layouts_of, picture, run

    print(f"efficient_attention_pop regional-accuracy: proxy model, regions {args.regions}, {args.images} images "
          f"each, {args.steps} steps, guidance 2, isolation {args.isolations}, base_weight {args.base_weights}, "
          f"torch {torch.__version__}, threads={torch.get_num_threads()}")
    started = time.perf_counter()
    rows, judge_accuracy = run(args.regions, args.images, args.steps, args.isolations, args.base_weights,
                               log=lambda line: print(line, file=sys.stderr))
    print(format_rows(rows))
    print(f"regions right: the judge (a CNN trained on the proxy's photographs, {judge_accuracy:.0%} right on fresh "
          f"crops) names the region's own class; seam: mean step across region borders / mean step between "
          f"neighbouring columns elsewhere; total {time.perf_counter() - started:.1f} s")
    if args.save:
        from .benchmark.proxy import load_proxy_model

        picture(load_proxy_model(), layouts_of(max(args.regions), 4, 13), args.steps, args.save, DEFAULTS.isolation,
                DEFAULTS.base_weight)
        print(f"picture: {args.save}")
    return 0


def gpu_report(args) -> int:
    from .benchmark.gpu_report import run_report

    return run_report(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="efficient-attention-pop",
                                     description="Efficient Attention (PoP): benchmark and environment report")
    sub = parser.add_subparsers(dest="command", required=True)
    from .benchmark.speed import DTYPES, PRESETS, QUICK_PRESETS

    presets = "\n".join(f"  {name:20s} {workload.describe()}" + (" (quick)" if name in QUICK_PRESETS else "")
                         for name, workload in PRESETS.items())
    bench_parser = sub.add_parser(
        "bench", help="time every available backend on diffusion-shaped attention, beside torch SDPA",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time every available backend beside torch SDPA on attention shaped like diffusion models' "
                    "(rounds interleaved, so each comparison runs under the same machine load), with its peak "
                    "memory and its error against exact attention. speedup = torch SDPA's median time / the "
                    "backend's median time (higher is faster).",
        epilog=f"presets (B batch, N queries, M keys, H heads, D head width):\n{presets}")
    bench_parser.add_argument("--preset", dest="presets", action="append", metavar="NAME", choices=list(PRESETS),
                              help="workload preset (repeatable; listed below); default: all, or the quick ones with "
                                   "--quick")
    bench_parser.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                              help="dtype of q, k and v (default fp32); errors are always against exact fp32 "
                                   "attention")
    bench_parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                              help="torch device to run on, e.g. cpu, cuda, cuda:1 (default: cuda where torch sees "
                                   "one, else cpu); on CUDA the table adds throughput (TFLOP/s or GB/s)")
    bench_parser.add_argument("--repeats", type=int, default=None, metavar="N",
                              help="timed rounds per workload, after one warm-up call (default 5, 3 with --quick)")
    bench_parser.add_argument("--backend", dest="backends", action="append", metavar="NAME",
                              help="backend to compare with torch SDPA (repeatable; `info` lists them); default: "
                                   "every available one plus ComfyUI-style naive attention as a memory reference")
    bench_parser.add_argument("--mask", choices=["both", "none", "mask"], default="both",
                              help="run each workload without a mask, with one (self-attention: two regions kept "
                                   "apart; cross-attention: padded text), or both (default)")
    bench_parser.add_argument("--quick", action="store_true",
                              help=f"presets {' and '.join(QUICK_PRESETS)} only, 3 rounds: under a minute on 2 idle "
                                   f"CPU cores, about 2 minutes when other jobs share them")
    bench_parser.set_defaults(func=bench)
    quality_parser = sub.add_parser(
        "quality", help="how far each backend moves the images of a trained model, beside its speed",
        description="Sample images with the trained proxy model (benchmark/proxy) with exact attention and with "
                    "every backend and option set, and report PSNR and SSIM against the exact images, the "
                    "per-layer attention error, and the speedup of attention and of the whole denoiser (exact time "
                    "/ backend time, higher is faster; median of interleaved rounds with their lowest and "
                    "highest, and a warning when the exact backend's own ratio strays from 1 by more than that "
                    "noise). Or, with --comfyui-model, measure the attention error on a model file of your own.")
    quality_parser.add_argument("--quick", action="store_true",
                                help="2 images, 8 steps, 32 and 64 px, 5 timing rounds: about 1 minute on 2 idle CPU "
                                     "cores, up to 10 minutes when other jobs share them")
    quality_parser.add_argument("--size", dest="sizes", type=int, action="append", metavar="PX",
                                help="image size in pixels (repeatable); default 32, 64 and 128 (1x, 4x, 16x the "
                                     "training token count); with --video each frame's, default 64; with "
                                     "--comfyui-model default 512")
    quality_parser.add_argument("--video", action="store_true",
                                help="the video proxy instead: 2 videos (1 with --quick) of --frames frames, 8 steps, "
                                     "3 timing rounds; adds each setting's motion and temporal error against exact")
    quality_parser.add_argument("--frames", type=int, default=None, metavar="N",
                                help="with --video: frames per video (default 16: 16 x 64 px is 16,384 tokens)")
    quality_parser.add_argument("--backend", dest="backends", action="append", metavar="NAME",
                                help="measure only this backend (repeatable; `info` lists them); default every "
                                     "backend")
    quality_parser.add_argument("--repeats", type=int, default=None, metavar="N",
                                help="timing rounds after one warm-up round (default 3, 5 with --quick)")
    quality_parser.add_argument("--steps", type=int, default=None, metavar="N",
                                help="sampling steps (default 12, 8 quick; 4 with --comfyui-model)")
    quality_parser.add_argument("--max-error", dest="max_errors", type=float, action="append", metavar="BOUND",
                                help="also measure every approximate backend under the node's quality guard with this "
                                     "bound (repeatable)")
    quality_parser.add_argument("--refresh", dest="refreshes", type=int, action="append", metavar="K",
                                help="also measure every approximate backend with the node's refresh mode: exact "
                                     "attention every K steps, its residual reused in between (repeatable); these "
                                     "rows are timed over whole sampling runs against the exact run")
    quality_parser.add_argument("--reuse", dest="reuses", action="append", choices=("residual", "output"),
                                help="with --refresh: what is reused between refreshes (default residual; output: "
                                     "the exact output itself, measured only, not offered by the node)")
    quality_parser.add_argument("--options", action="append", metavar="NAME=VALUE[,NAME=VALUE]",
                                help="measure only these option sets of the approximate backends that take them, "
                                     "the rest at their defaults, e.g. window=16,downsample=4 or "
                                     "tile=8,tile_frames=2,radial=true (repeatable)")
    quality_parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                                help="torch device for the model, e.g. cpu, cuda (default: cuda where torch sees one, "
                                     "else cpu)")
    quality_parser.add_argument("--save", metavar="DIR",
                                help="also write one picture per size to DIR: the exact images and each setting's "
                                     "in rows, each labelled with its PSNR and speedups")
    quality_parser.add_argument("--json", metavar="FILE",
                                help="also write the rows to FILE, one JSON object per row")
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
    regional_parser = sub.add_parser(
        "regional-speed", help="whole sampling runs with a prompt per region: one pass against ComfyUI's own masked "
                               "conditioning (needs ComfyUI importable)")
    regional_parser.add_argument("--model", dest="models", action="append", choices=("sd15", "flux"),
                                 help="sd15 (full-size UNet, 512 px) and/or flux (Flux-shaped DiT, 1024 px); default "
                                      "both")
    regional_parser.add_argument("--regions", type=int, nargs="+", default=[2, 4, 8], help="region counts (2 4 8)")
    regional_parser.add_argument("--steps", type=int, default=2, help="euler steps per run (default 2)")
    regional_parser.add_argument("--repeats", type=int, default=2, help="timed rounds after a warm-up (default 2)")
    regional_parser.add_argument("--isolation", type=float, default=0.2,
                                 help="the node's isolation (default 0.2, its default; 1: every step keeps the "
                                      "regions' image tokens apart, the most masked attention)")
    regional_parser.set_defaults(func=regional_speed, models=None)
    accuracy_parser = sub.add_parser(
        "regional-accuracy", help="does each prompt land in its region: one pass against ComfyUI's way on the "
                                  "trained proxy model, judged by a classifier (needs scikit-image)")
    accuracy_parser.add_argument("--regions", type=int, nargs="+", default=[2, 3], help="region counts (2 3)")
    accuracy_parser.add_argument("--images", type=int, default=24, help="images per region count (24)")
    accuracy_parser.add_argument("--steps", type=int, default=12, help="sampling steps (12)")
    accuracy_parser.add_argument("--isolation", dest="isolations", type=float, nargs="+", default=[0.0, 0.2, 0.3, 1.0])
    accuracy_parser.add_argument("--base-weight", dest="base_weights", type=float, nargs="+", default=[0.0, 0.3, 1.0])
    accuracy_parser.add_argument("--save", metavar="PNG", help="also draw samples: ComfyUI's way above one pass")
    accuracy_parser.set_defaults(func=regional_accuracy)
    info_parser = sub.add_parser("info", help="versions, device, which backends are available here and which the "
                                              "ComfyUI node offers, and why not")
    info_parser.set_defaults(func=info)
    args = parser.parse_args(argv)
    if args.command == "regional-speed":
        args.models = args.models or ["sd15", "flux"]
    args.argv = ["python -m efficient_attention_pop"] + list(sys.argv[1:] if argv is None else argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
