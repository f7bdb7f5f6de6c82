"""``gpu-report`` on CPU in its --quick configuration: the report's content, stage failures and time limits."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from efficient_attention_pop.benchmark import gpu_report


def run_report(out, *extra, timeout=240):
    command = [sys.executable, "-m", "efficient_attention_pop", "gpu-report", "--device", "cpu", "--quick",
               "--out", str(out), *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    report = (out / "report.md").read_text()
    return result, report, json.loads((out / "report.json").read_text())


def stage_rows(report):
    """stage -> status from the report's Stages table."""
    section = report.split("## Stages", 1)[1].split("##", 1)[0]
    return {cells[0]: cells[1] for cells in (
        [c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| "))
        if cells[0] in gpu_report.STAGES}


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    return run_report(tmp_path_factory.mktemp("report"))


def test_quick_cpu_report_has_every_stage_and_the_environment(quick_report):
    result, report, data = quick_report
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^\| device +\| cpu +\|$", report, re.M)
    for key in ("python", "torch", "triton"):
        assert re.search(rf"^\| {key} +\| \S", report, re.M), key
    assert stage_rows(report) == {"tests": "ok", "bench": "ok", "quality": "ok"}
    assert data["stages"]["tests"]["counts"]["passed"] >= 1 and data["stages"]["tests"]["counts"]["failed"] == 0
    assert "## Speed" in report and "## Quality" in report and "## Issue 17 targets" in report
    assert "Not measured: this is a CPU run" in report  # no GPU figures are claimed on CPU
    for stage in ("bench", "quality"):
        assert data["stages"][stage]["data"]["rows"], stage


def test_speedup_is_sdpa_time_over_backend_time(quick_report):
    _, report, data = quick_report
    rows = data["stages"]["bench"]["data"]["rows"]
    assert {r["backend"] for r in rows} >= {"torch SDPA", "sdpa", "masked", "linear"}
    for row in rows:
        base = next(r for r in rows if (r["workload"], r["variant"], r["dtype"], r["backend"])
                    == (row["workload"], row["variant"], row["dtype"], "torch SDPA"))
        assert row["speedup"] == pytest.approx(base["median_ms"] / row["median_ms"])
    # in the Markdown table too: speedup > 1 exactly where the backend's time is below torch SDPA's
    table = [line for line in report.splitlines() if line.startswith("| cpu-256-self")]
    assert len(table) == len(rows)
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        ms, sdpa_ms, speedup = float(cells[3]), float(cells[4]), float(cells[5].rstrip("x"))
        assert speedup == pytest.approx(sdpa_ms / ms, rel=0.02, abs=0.01)


def test_failing_stages_are_reported_and_the_others_still_run(tmp_path):
    failing = tmp_path / "test_injected.py"
    failing.write_text("def test_passes():\n    pass\n\n\n"
                       "def test_injected_failure():\n    assert 1 + 1 == 3, 'injected failure 7x'\n")
    result, report, data = run_report(tmp_path / "out", "--tests", str(failing), "--preset", "no-such-preset")
    assert result.returncode == 1
    assert stage_rows(report) == {"tests": "failed", "bench": "error", "quality": "ok"}
    assert data["stages"]["tests"]["counts"] == dict(passed=1, failed=1, errors=0, skipped=0)
    failure = re.search(r"^- `.*test_injected_failure` \(failed\): (.*)$", report, re.M)
    assert failure and "injected failure 7x" in failure.group(1)
    assert "unknown preset 'no-such-preset'" in report
    assert data["stages"]["quality"]["data"]["rows"]


def test_a_stage_past_its_budget_is_stopped_and_reported(tmp_path):
    hanging = tmp_path / "test_hangs.py"
    hanging.write_text("import time\n\n\ndef test_hangs():\n    time.sleep(600)\n")
    result, report, data = run_report(tmp_path / "out", "--tests", str(hanging), "--tests-budget", "6",
                                      "--stage", "tests", "--stage", "bench")
    assert stage_rows(report) == {"tests": "timed out", "bench": "ok"}
    assert data["stages"]["tests"]["seconds"] < 40
    assert re.search(r"^- \*\*tests timed out\*\*: stopped after its budget of 6 s", report, re.M)
    assert "quality" not in data["stages"]


def test_total_budget_skips_what_no_longer_fits(tmp_path):
    result, report, data = run_report(tmp_path / "out", "--total-budget", "4", "--stage", "bench")
    assert stage_rows(report) == {"bench": "skipped"}
    assert "no time left in the total budget" in report


def test_plan_defaults_per_device():
    parser = __import__("argparse").ArgumentParser()
    gpu_report.add_arguments(parser, "cpu")
    cuda = gpu_report.make_plan(_with_argv(parser.parse_args(["--out", "x", "--device", "cuda"])))
    cpu = gpu_report.make_plan(_with_argv(parser.parse_args(["--out", "x", "--device", "cpu"])))
    assert cuda["dtypes"] == ["bf16", "fp16"] and {"flux-1024-joint", "sd15-1024-self"} <= set(cuda["presets"])
    assert sum(cuda["budgets"].values()) <= cuda["total"] <= 8 * 60
    assert "tests/test_kernels.py" in cuda["tests"] and "tests/test_kernels.py" in cpu["tests"]
    assert all(gpu_report.workload(name).n <= 1088 for name in cpu["presets"])  # CPU: small workloads only
    overridden = gpu_report.make_plan(_with_argv(parser.parse_args(
        ["--out", "x", "--device", "cpu", "--bench-budget", "7", "--dtype", "fp32", "--repeats", "2"])))
    assert overridden["budgets"]["bench"] == 7 and overridden["dtypes"] == ["fp32"] and overridden["repeats"] == 2


def _with_argv(args):
    args.argv = ["test"]
    return args


def test_help_describes_every_option():
    result = subprocess.run([sys.executable, "-m", "efficient_attention_pop", "gpu-report", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for option in ("--out", "--device", "--stage", "--total-budget", "--tests-budget", "--bench-budget",
                   "--quality-budget", "--tests", "--preset", "--dtype", "--repeats", "--backend", "--quality-size",
                   "--quick"):
        assert re.search(rf"^  {option}\b.*\n?.*\S", result.stdout, re.M), option
