"""``gpu-report``: one command that checks and measures the pack on one device and writes one Markdown report.

Three stages, each in its own subprocess with its own time limit, so a stage that fails, hangs or breaks
the CUDA context cannot stop the others:

- ``tests``: the device-parametrised tests (``EFFICIENT_ATTENTION_POP_DEVICE=<device>``; on CUDA the
  Triton kernels compile for real, on CPU they run under TRITON_INTERPRET=1 as in the suite), via pytest
  with ``--junitxml``; every failure with its message goes into the report.
- ``bench``: ``benchmark.speed.run`` per dtype and workload, every backend beside torch SDPA.
- ``quality``: ``benchmark.quality.run`` on the proxy model, a reduced set of sizes and images.

Each stage writes its raw JSON beside the report as it goes, so a stage cut off by its budget still
reports what it finished. Speedup everywhere here is torch SDPA time / backend time (higher is faster).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Dict, List, Optional

STAGES = ("tests", "bench", "quality")
DEVICE_ENV = "EFFICIENT_ATTENTION_POP_DEVICE"  # read by tests/helpers.py
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
SDPA_LABEL = "torch SDPA"

# Small workloads for CPU runs (names not in speed.PRESETS): (batch, n, m, heads, dim, text_tokens, cross).
CPU_WORKLOADS = {
    "cpu-1024-self": (1, 1024, 1024, 8, 40, 0, False),
    "cpu-joint-64+1024": (1, 1088, 1088, 4, 64, 64, False),
    "cpu-1024-cross": (1, 1024, 77, 8, 40, 0, True),
    "cpu-256-self": (1, 256, 256, 2, 32, 0, False),
}

# Per device: the pytest selection, bench workloads / dtypes / repeats, quality sizes / setup, and budgets (s).
DEFAULTS = {
    "cuda": dict(tests=["tests/test_kernels.py", "tests/test_attention.py", "tests/test_grid_backends.py",
                        "tests/test_tiles.py"],
                 presets=["flux-1024-joint", "sd15-1024-self", "sdxl-1024-self", "sd15-512-cross", "flux-2048-joint"],
                 dtypes=["bf16", "fp16"], repeats=10, quality_sizes=[64, 128],
                 quality_setup=dict(classes=[1, 8], steps=8, repeats=3),
                 budgets=dict(tests=200, bench=180, quality=100), total=480),
    "cpu": dict(tests=["tests/test_kernels.py", "tests/test_grid_backends.py"],
                presets=["cpu-1024-self", "cpu-joint-64+1024", "cpu-1024-cross"],
                dtypes=["bf16", "fp16"], repeats=3, quality_sizes=[32],
                quality_setup=dict(classes=[1], steps=6, repeats=1),
                budgets=dict(tests=150, bench=180, quality=120), total=450),
}
# --quick: the smallest run of every stage (the CLI's own tests use it; well under a minute on 2 cores).
QUICK = dict(tests=["tests/test_kernels.py::test_linear_triton_matches_naive"], presets=["cpu-256-self"],
             dtypes=["bf16"], repeats=1, backends=["sdpa", "masked", "linear"], quality_sizes=[32],
             quality_backends=["sdpa", "linear"], quality_setup=dict(classes=[1], steps=2, repeats=1))


# ------------------------------------------------------------------------------------------------ the plan

def make_plan(args) -> dict:
    """The JSON plan every stage subprocess reads: the device's defaults, --quick, then the explicit options."""
    device = args.device
    plan = dict(DEFAULTS["cuda" if device.startswith("cuda") else "cpu"], backends=None, quality_backends=None)
    plan["budgets"] = dict(plan["budgets"])
    if args.quick:
        plan.update(QUICK)
    explicit = dict(tests=args.tests, presets=args.presets, dtypes=args.dtypes, repeats=args.repeats,
                    backends=args.backends, quality_sizes=args.quality_sizes)
    plan.update({key: value for key, value in explicit.items() if value is not None})
    if args.backends is not None:
        plan["quality_backends"] = args.backends
    for stage in STAGES:
        value = getattr(args, f"{stage}_budget")
        if value is not None:
            plan["budgets"][stage] = value
    if args.total_budget is not None:
        plan["total"] = args.total_budget
    plan.update(device=device, stages=args.stages or list(STAGES), out=str(Path(args.out).resolve()),
                argv=args.argv)
    return plan


def workload(name: str):
    """A bench workload by name: one of speed.PRESETS or of CPU_WORKLOADS."""
    from .speed import PRESETS, Workload

    if name in PRESETS:
        return PRESETS[name]
    if name in CPU_WORKLOADS:
        batch, n, m, heads, dim, text, cross = CPU_WORKLOADS[name]
        return Workload(name, batch, n, m, heads, dim, text_tokens=text, cross=cross)
    raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS) + sorted(CPU_WORKLOADS)}")


# ----------------------------------------------------------------------------- stages (in subprocesses)

def _dump(path: Path, data) -> None:
    """Write JSON atomically, so a stage killed mid-write leaves the previous complete file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def speedup_rows(rows: List[dict]) -> List[dict]:
    """Add ``speedup`` = torch SDPA median / backend median, from the same workload, mask and dtype."""
    baselines = {(r["dtype"], r["workload"], r["variant"]): r["median_ms"] for r in rows if r["backend"] == SDPA_LABEL}
    for row in rows:
        base = baselines.get((row["dtype"], row["workload"], row["variant"]))
        row["speedup"] = base / row["median_ms"] if base and row["median_ms"] > 0 else None
    return rows


def stage_bench(plan: dict) -> None:
    """Every backend beside torch SDPA, per dtype and workload; bench.json rewritten after each workload."""
    import torch

    from . import speed

    out = Path(plan["out"]) / "bench.json"
    result = {"rows": [], "errors": [], "workloads": {}}
    for dtype in plan["dtypes"]:
        for name in plan["presets"]:
            try:
                work = workload(name)
                result["workloads"][name] = work.describe()
                rows = speed.run([work], speed.DTYPES[dtype], plan["device"], repeats=plan["repeats"],
                                 backends=plan["backends"], progress=sys.stderr)
                result["rows"] += [dict(dataclasses.asdict(row), dtype=dtype) for row in rows]
            except Exception as error:  # one workload failing (e.g. out of memory) must not stop the rest
                result["errors"].append(f"{dtype} {name}: {type(error).__name__}: {error}")
                if plan["device"].startswith("cuda"):
                    torch.cuda.empty_cache()
            speedup_rows(result["rows"])
            _dump(out, result)


def stage_quality(plan: dict) -> None:
    """The quality benchmark on the proxy model, one size at a time; quality.json rewritten after each size."""
    from . import quality
    from .proxy import load_proxy_model

    setup = quality.QualitySetup(classes=tuple(plan["quality_setup"]["classes"]), steps=plan["quality_setup"]["steps"],
                                 repeats=plan["quality_setup"]["repeats"])
    model = load_proxy_model(plan["device"])
    out = Path(plan["out"]) / "quality.json"
    result = {"rows": [], "notes": [], "setup": dataclasses.asdict(setup)}
    for size in plan["quality_sizes"]:
        rows, notes = quality.run(model, [size], setup, plan["quality_backends"], (), progress=sys.stderr)
        result["rows"] += quality.rows_as_json(rows)
        result["notes"] += notes
        _dump(out, result)


# ------------------------------------------------------------------------------ running a stage with a limit

def _run_limited(command: List[str], log: Path, budget: float, env: Optional[dict] = None,
                 cwd: Optional[Path] = None) -> dict:
    """Run ``command`` with its output in ``log``; past ``budget`` seconds send SIGINT (pytest then writes
    its results so far), then SIGKILL the process group 20 s later. Returns returncode, seconds, timed_out."""
    started = time.perf_counter()
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                   start_new_session=True)
        timed_out = False
        try:
            process.wait(timeout=max(budget, 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return dict(returncode=process.returncode, seconds=time.perf_counter() - started, timed_out=timed_out)


def _tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _stage_env(device: str) -> dict:
    env = dict(os.environ, **{DEVICE_ENV: device})
    env.pop("TRITON_INTERPRET", None)  # CPU test modules set it themselves; on CUDA the kernels must compile
    return env


def parse_junit(path: Path) -> dict:
    """Counts and each failing or erroring test with its message, from pytest's --junitxml file."""
    counts = dict(passed=0, failed=0, errors=0, skipped=0)
    failures = []
    root = ElementTree.parse(path).getroot()
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        problem = case.find("failure")
        kind = "failed"
        if problem is None:
            problem, kind = case.find("error"), "errors"
        if problem is not None:
            counts[kind] += 1
            text = problem.get("message") or (problem.text or "").strip().splitlines()[-1:] or [""]
            failures.append(dict(test=name, kind=kind, message=text if isinstance(text, str) else text[0]))
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return dict(counts=counts, failures=failures)


def run_tests_stage(plan: dict, budget: float) -> dict:
    out = Path(plan["out"])
    junit, log = out / "tests-junit.xml", out / "tests.log"
    junit.unlink(missing_ok=True)
    selection = [t if os.path.isabs(t) else str(PACKAGE_ROOT / t) for t in plan["tests"]]
    missing = [t for t in selection if not Path(t.split("::")[0]).exists()]
    if missing:
        return dict(status="error", seconds=0.0, message=f"test files not found in this install: {missing}")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rN", f"--junitxml={junit}",
               "--rootdir", str(PACKAGE_ROOT), *selection]
    run = _run_limited(command, log, budget, env=_stage_env(plan["device"]), cwd=PACKAGE_ROOT)
    result = dict(seconds=run["seconds"], returncode=run["returncode"])
    if junit.exists():
        result.update(parse_junit(junit))
    if run["timed_out"]:
        result.update(status="timed out", message=f"stopped after its budget of {budget:.0f} s (results so far below)")
    elif "counts" not in result:
        result.update(status="error", message=f"pytest exited with {run['returncode']} and wrote no results:\n"
                                               f"{_tail(log)}")
    elif run["returncode"] not in (0, 1) or result["counts"]["failed"] or result["counts"]["errors"]:
        result.update(status="failed", message=f"pytest exit status {run['returncode']}")
    else:
        result.update(status="ok")
    return result


def run_python_stage(stage: str, plan: dict, budget: float) -> dict:
    """bench or quality in a subprocess (``python -m ...gpu_report --stage STAGE --plan FILE``)."""
    out = Path(plan["out"])
    data_file, log = out / f"{stage}.json", out / f"{stage}.log"
    data_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", f"{__package__}.gpu_report", "--stage", stage, "--plan", str(out / "plan.json")]
    run = _run_limited(command, log, budget, env=_stage_env(plan["device"]), cwd=PACKAGE_ROOT)
    result = dict(seconds=run["seconds"], returncode=run["returncode"])
    if data_file.exists():
        result["data"] = json.loads(data_file.read_text())
    errors = result.get("data", {}).get("errors", [])
    if run["timed_out"]:
        result.update(status="timed out", message=f"stopped after its budget of {budget:.0f} s (results so far below)")
    elif run["returncode"] != 0:
        result.update(status="error", message=f"exit status {run['returncode']}:\n{_tail(log)}")
    elif errors:
        result.update(status="error", message="; ".join(errors))
    else:
        result.update(status="ok")
    return result


# ------------------------------------------------------------------------------------------- the report

def environment(device: str) -> Dict[str, str]:
    """Device, driver, CUDA, torch, Triton, Python, CPU threads and known peak numbers."""
    import torch

    from .speed import triton_version

    env = {"device": "cpu", "python": platform.python_version(), "torch": torch.__version__,
           "triton": triton_version(), "CUDA (torch build)": str(torch.version.cuda),
           "CPU": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                  f"{torch.get_num_threads()} torch threads", "platform": platform.platform()}
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        env["device"] = (f"{props.name}, compute capability {props.major}.{props.minor}, "
                         f"{props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")
        env["driver"] = _driver_version()
        tflops, gbps = device_peaks(props.name)
        env["peak"] = (f"{tflops:.0f} TFLOP/s dense fp16/bf16, {gbps:.0f} GB/s" if tflops
                       else "unknown to benchmark/speed.py DEVICE_PEAKS")
    elif device.startswith("cuda"):
        env["device"] = f"{device} asked for, but torch sees no CUDA device"
    return env


def _driver_version() -> str:
    try:
        query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
        if query.returncode == 0 and query.stdout.strip():
            return query.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        return Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
    except OSError:
        return "unknown"


def device_peaks(name: str):
    """(TFLOP/s, GB/s) of the device named ``name`` from speed.DEVICE_PEAKS, or (None, None)."""
    from .speed import DEVICE_PEAKS

    for key, peaks in DEVICE_PEAKS.items():
        if key in name:
            return peaks
    return None, None


def _of_peak(throughput: str, peaks) -> str:
    """'42%' of the device's peak for a 'X TFLOP/s' or 'Y GB/s' figure, '-' where unknown."""
    parts = (throughput or "").split()
    if len(parts) != 2 or peaks[0] is None:
        return "-"
    peak = peaks[0] if parts[1] == "TFLOP/s" else peaks[1] if parts[1] == "GB/s" else None
    return f"{100 * float(parts[0]) / peak:.0f}%" if peak else "-"


def _bench_tables(data: dict, peaks) -> List[str]:
    from .table import markdown_table

    lines = [f"- `{name}`: {shape}" for name, shape in data.get("workloads", {}).items()]
    for dtype in dict.fromkeys(row["dtype"] for row in data["rows"]):
        rows = [r for r in data["rows"] if r["dtype"] == dtype]
        lines += ["", f"#### {dtype}", "", markdown_table(
            ["workload", "mask", "backend", "median ms", "torch SDPA ms", "speedup", "throughput", "of peak",
             "max abs err", "cosine"],
            [[r["workload"], r["variant"], r["backend"], f"{r['median_ms']:.3f}",
              f"{r['median_ms'] * r['speedup']:.3f}" if r["speedup"] else "-",
              f"{r['speedup']:.2f}x" if r["speedup"] else "-", r.get("throughput") or "-",
              _of_peak(r.get("throughput"), peaks), f"{r['max_abs_err']:.2e}", f"{r['cosine']:.5f}"] for r in rows])]
    return lines


def targets(bench: Optional[dict], device: str, peaks) -> List[str]:
    """Issue 17's bf16 targets, each met / missed (by how much) / not measured."""
    if not device.startswith("cuda"):
        return ["Not measured: this is a CPU run (the Triton kernels are not timed under the interpreter, and the "
                "targets are for an H100-class GPU)."]
    rows = [r for r in (bench or {}).get("rows", []) if r["dtype"] == "bf16"]

    def find(workload, variant, backend):
        return next((r for r in rows if (r["workload"], r["variant"], r["backend"]) == (workload, variant, backend)),
                    None)

    def speed_target(what, row, goal):
        if row is None or row["speedup"] is None:
            return f"- {what}: not measured"
        verdict = "met" if row["speedup"] >= goal else f"MISSED by {goal - row['speedup']:.2f}x"
        return f"- {what}: {row['speedup']:.2f}x (target >= {goal}x): {verdict}"

    lines = []
    for name in ("flux-1024-joint", "sd15-1024-self"):
        lines.append(speed_target(f"masked_triton, no mask, {name}", find(name, "none", "masked_triton"), 0.8))
        lines.append(speed_target(f"masked_triton isolate-regions RegionMask vs torch SDPA with the dense mask, {name}",
                                  find(name, "mask", "masked_triton[region]"), 1.5))
    big = [r for r in rows if r["backend"] == "linear_triton" and r["variant"] == "none"
           and _tokens(bench, r["workload"]) >= 16384]
    for r in big:
        share = _of_peak(r.get("throughput"), peaks)
        if share == "-":
            lines.append(f"- linear_triton HBM bandwidth, {r['workload']}: {r.get('throughput')} (device peak unknown)")
        else:
            verdict = "met" if int(share[:-1]) >= 70 else f"MISSED by {70 - int(share[:-1])} points"
            lines.append(f"- linear_triton HBM bandwidth, {r['workload']}: {r.get('throughput')} = {share} of peak "
                         f"(target >= 70%): {verdict}")
    if not big:
        lines.append("- linear_triton HBM bandwidth at N >= 16k: not measured")
    approx = _approximate_rows(rows)
    lines.append("- approximations' speedup over torch SDPA (bf16, no mask): " + (
        "; ".join(f"{r['backend']} {r['workload']} {r['speedup']:.2f}x" for r in approx) or "not measured"))
    return lines


def _tokens(bench: dict, workload_name: str) -> int:
    shape = bench.get("workloads", {}).get(workload_name, "")
    return next((int(part[2:]) for part in shape.split() if part.startswith("N=")), 0)


def _approximate_rows(rows: List[dict]) -> List[dict]:
    from ..attention import BACKENDS

    def exact(label):
        backend = BACKENDS.get(label.split()[0].split("[")[0])
        return backend is None or backend.exact

    return [r for r in rows if r["variant"] == "none" and not exact(r["backend"]) and r["speedup"]]


def write_report(plan: dict, env: Dict[str, str], results: Dict[str, dict], total_seconds: float) -> Path:
    """report.md and report.json in the output folder; returns the Markdown file's path."""
    from .table import markdown_table

    out = Path(plan["out"])
    peaks = device_peaks(env["device"]) if plan["device"].startswith("cuda") else (None, None)
    lines = ["# Efficient Attention (PoP): device report", "",
             f"`{' '.join(plan['argv'])}`, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, "
             f"total {total_seconds:.0f} s of a {plan['total']:.0f} s budget.", "",
             "Speedup = torch SDPA time / backend time on the same inputs and mask (higher is faster).", "",
             "## Environment", "", markdown_table(["", ""], [[key, value] for key, value in env.items()]), "",
             "## Stages", "", markdown_table(["stage", "status", "seconds", "budget s", "summary"], [
                 [stage, r["status"], f"{r.get('seconds', 0):.1f}", f"{r.get('budget', 0):.0f}", _summary(stage, r)]
                 for stage, r in results.items()]), ""]
    for stage, r in results.items():
        if r["status"] not in ("ok", "skipped"):
            lines.append(f"- **{stage} {r['status']}**: {r.get('message', '').splitlines()[0] if r.get('message') else ''}")
    lines += ["", "## Issue 17 targets (bf16)", ""] + targets(results.get("bench", {}).get("data"), plan["device"], peaks)
    tests = results.get("tests")
    if tests:
        lines += ["", "## Tests", "", f"Selection: {' '.join(plan['tests'])} with {DEVICE_ENV}={plan['device']}.", ""]
        for failure in tests.get("failures", []):
            lines.append(f"- `{failure['test']}` ({failure['kind']}): {failure['message'][:600]}")
        if not tests.get("failures"):
            lines.append("No failures." if tests["status"] == "ok" else "")
        if tests.get("message"):
            lines += ["", "```", tests["message"], "```"]
    bench = results.get("bench")
    if bench:
        lines += ["", "## Speed (every backend beside torch SDPA)", ""]
        if bench.get("data", {}).get("rows"):
            lines += _bench_tables(bench["data"], peaks)
        for error in bench.get("data", {}).get("errors", []):
            lines.append(f"- error: {error}")
        if bench["status"] != "ok" and bench.get("message"):
            lines += ["", "```", bench["message"], "```"]
    quality = results.get("quality")
    if quality:
        lines += ["", "## Quality (proxy model)", ""]
        data = quality.get("data", {})
        if data.get("rows"):
            lines += [f"Setup: {data['setup']}; speedup = exact / backend time of one guided denoiser call.", "",
                      markdown_table(["backend", "options", "px", "attn speedup", "denoiser speedup", "PSNR dB", "SSIM",
                                      "attn cosine"],
                                     [[r["backend"], " ".join(f"{k}={v}" for k, v in r["options"].items()) or "-",
                                       str(r["image_size"]), f"{r['attention_speedup']:.2f}x",
                                       f"{r['denoiser_speedup']:.2f}x", f"{r['psnr_db']:.2f}", f"{r['ssim']:.4f}",
                                       f"{r['attn_cosine']:.4f}"] for r in data["rows"]])]
        lines += [f"- note: {note}" for note in data.get("notes", [])]
        if quality["status"] != "ok" and quality.get("message"):
            lines += ["", "```", quality["message"], "```"]
    lines.append("")
    report = out / "report.md"
    report.write_text("\n".join(lines))
    _dump(out / "report.json", dict(plan=plan, environment=env, stages=results, total_seconds=total_seconds))
    return report


def _summary(stage: str, result: dict) -> str:
    if stage == "tests" and "counts" in result:
        return ", ".join(f"{value} {key}" for key, value in result["counts"].items())
    data = result.get("data") or {}
    if data.get("rows"):
        return f"{len(data['rows'])} rows" + (f", {len(data['errors'])} errors" if data.get("errors") else "")
    return (result.get("message") or "").splitlines()[0][:120] if result.get("message") else "-"


# ----------------------------------------------------------------------------------------------- the command

def run_report(args) -> int:
    """Run the chosen stages within their budgets and write the report; exit status 1 if any stage did not pass."""
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    plan = make_plan(args)
    unknown = [s for s in plan["stages"] if s not in STAGES]
    if unknown:
        print(f"error: unknown stage(s) {unknown}; choose from {list(STAGES)}", file=sys.stderr)
        return 2
    out = Path(plan["out"])
    out.mkdir(parents=True, exist_ok=True)
    _dump(out / "plan.json", plan)
    started = time.perf_counter()
    env = environment(plan["device"])
    results: Dict[str, dict] = {}
    for stage in plan["stages"]:
        left = plan["total"] - (time.perf_counter() - started)
        budget = min(plan["budgets"][stage], left)
        if budget < 5:
            results[stage] = dict(status="skipped", budget=max(budget, 0), message="no time left in the total budget")
            continue
        print(f"gpu-report: {stage} (budget {budget:.0f} s) ...", file=sys.stderr, flush=True)
        try:
            result = run_tests_stage(plan, budget) if stage == "tests" else run_python_stage(stage, plan, budget)
        except Exception as error:  # the report is written whatever one stage does
            result = dict(status="error", seconds=0.0, message=f"{type(error).__name__}: {error}")
        result["budget"] = budget
        results[stage] = result
        print(f"gpu-report: {stage} {result['status']} in {result.get('seconds', 0):.1f} s", file=sys.stderr)
    report = write_report(plan, env, results, time.perf_counter() - started)
    print(f"report: {report}")
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


def add_arguments(parser: argparse.ArgumentParser, default_device: str) -> None:
    """The gpu-report options (shared by __main__.py's subparser)."""
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for report.md, report.json and each stage's raw JSON, JUnit XML and log")
    parser.add_argument("--device", default=default_device,
                        help=f"cuda (default where torch sees one) or cpu; now: {default_device}")
    parser.add_argument("--stage", dest="stages", action="append", choices=STAGES,
                        help="run only this stage (repeatable); default all: tests, bench, quality")
    parser.add_argument("--total-budget", type=float, default=None, metavar="S",
                        help=f"seconds for all stages together (default {DEFAULTS['cuda']['total']} on CUDA, "
                             f"{DEFAULTS['cpu']['total']} on CPU); a stage gets at "
                             "most what is left, and is skipped with under 5 s left")
    for stage in STAGES:
        cuda, cpu = DEFAULTS["cuda"]["budgets"][stage], DEFAULTS["cpu"]["budgets"][stage]
        parser.add_argument(f"--{stage}-budget", type=float, default=None, metavar="S",
                            help=f"seconds for the {stage} stage (default {cuda} on CUDA, {cpu} on CPU); past it the "
                                 f"stage is stopped and reported as timed out with what it finished")
    parser.add_argument("--tests", dest="tests", action="append", metavar="PATH[::TEST]",
                        help="pytest selection, relative to the pack's folder or absolute (repeatable); default: the "
                             "device-parametrised test files (test_kernels, test_attention, test_grid_backends, test_tiles on "
                             "CUDA; test_kernels, test_grid_backends on CPU)")
    parser.add_argument("--preset", dest="presets", action="append",
                        help="bench workload (repeatable): a `bench` preset or one of the small CPU ones "
                             f"{sorted(CPU_WORKLOADS)}; default: Flux 1024/2048 joint, SD1.5 1024 self and 512 cross, "
                             "SDXL 1024 on CUDA, the small CPU ones on CPU")
    parser.add_argument("--dtype", dest="dtypes", action="append", choices=["bf16", "fp16", "fp32"],
                        help="bench dtype (repeatable); default bf16 and fp16")
    parser.add_argument("--repeats", type=int, default=None, help="bench timing rounds (default 10 on CUDA, 3 on CPU)")
    parser.add_argument("--backend", dest="backends", action="append",
                        help="bench and quality: only this backend beside torch SDPA (repeatable); default all")
    parser.add_argument("--quality-size", dest="quality_sizes", type=int, action="append", metavar="PX",
                        help="quality image size (repeatable); default 64 and 128 on CUDA, 32 on CPU")
    parser.add_argument("--quick", action="store_true",
                        help="the smallest run of every stage (one test, one 256-token workload, one 32 px image "
                             "with 2 steps): checks the command itself in well under a minute")


def _stage_main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description="one gpu-report stage (run by gpu-report itself)")
    parser.add_argument("--stage", choices=["bench", "quality"], required=True)
    parser.add_argument("--plan", required=True)
    args = parser.parse_args(argv)
    plan = json.loads(Path(args.plan).read_text())
    (stage_bench if args.stage == "bench" else stage_quality)(plan)
    return 0


if __name__ == "__main__":
    sys.exit(_stage_main(sys.argv[1:]))
