"""`bench` and `quality` report speed one way: speedup = torch SDPA (exact) time / backend time, higher is faster."""
from __future__ import annotations

import time

import pytest

from efficient_attention_pop.__main__ import main
from efficient_attention_pop.attention import BACKENDS
from efficient_attention_pop.benchmark import speed
from efficient_attention_pop.benchmark.quality import Speedup, timing_warnings

TINY = speed.Workload("tiny-self", 1, 256, 256, 2, 16)


def test_a_slower_backend_gets_a_speedup_below_one(monkeypatch):
    """masked made 20 ms slower per call: its speedup falls below 1, torch SDPA's own row is exactly 1, and every
    row's speedup is torch SDPA's median time / its median time."""
    backend = BACKENDS["masked"]
    forward = backend.forward

    def slow(call):
        time.sleep(0.02)
        return forward(call)

    monkeypatch.setattr(backend, "forward", slow)
    rows = speed.run([TINY], repeats=3, masks=("none",), backends=["sdpa", "masked"], progress=None)
    by_label = {row.backend: row for row in rows}
    assert by_label["torch SDPA"].speedup == 1.0
    assert by_label["masked"].speedup < 0.5 < by_label["sdpa"].speedup
    for row in rows:
        assert row.speedup == pytest.approx(by_label["torch SDPA"].median_ms / row.median_ms)
    header = speed.format_table(rows, "cpu").splitlines()[0]
    assert [c.strip() for c in header.strip("|").split("|")][4] == "speedup"


def test_bench_command_names_the_direction(capsys):
    assert main(["bench", "--preset", "sd15-512-cross", "--backend", "sdpa", "--mask", "none", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| workload"))
    assert [c.strip() for c in header.strip("|").split("|")][4] == "speedup"
    assert "higher is faster" in out and "x torch SDPA" not in out


def options_without_help(text: str) -> list:
    """The options of an argparse --help text that have no help: argparse writes an option's help after it on
    the same line, or, when the option is long, on the next line, indented."""
    import re

    lines = text.splitlines()
    missing = []
    for index, line in enumerate(lines):
        match = re.match(r"^  (-\w, )?(--[\w-]+)(.*)$", line)
        if not match or match.group(2) == "--help":
            continue
        same_line = re.split(r"\s{2,}", match.group(3).rstrip(), maxsplit=1)
        following = lines[index + 1] if index + 1 < len(lines) else ""
        has_help = (len(same_line) == 2 and same_line[1]) or (
            following.startswith("    ") and not following.strip().startswith("-") and following.strip())
        if not has_help:
            missing.append(match.group(2))
    return missing


def test_help_describes_every_option_and_lists_the_presets(capsys):
    assert options_without_help("  --bare\n  --described  it says\n  --long-one ARG\n          on the next line\n") \
        == ["--bare"]
    for command in ("bench", "quality"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert text.count("\n  --") >= 7 and options_without_help(text) == [], text
        if command == "bench":
            assert all(name in text for name in speed.PRESETS)


def test_info_says_which_backends_the_node_offers_and_why_not_the_others(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    offered = next(line for line in out.splitlines() if line.startswith("the ComfyUI node offers here:"))
    assert "agent" not in offered and "window" in offered and "todo" in offered
    agent = next(line for line in out.splitlines() if line.strip().startswith("agent "))
    assert "library only, not in the node" in agent and BACKENDS["agent"].not_in_node in agent


def speedups(exact, backend):
    return Speedup.of_rounds(exact, backend)


def test_speedup_is_the_median_round_ratio_with_its_spread():
    s = speedups([1.0, 1.0, 1.0, 1.0, 1.0], [0.5, 0.4, 0.5, 0.25, 0.5])
    assert (s.median, s.low, s.high, s.rounds) == (2.0, 2.0, 4.0, 5)


def test_exact_backend_off_one_beyond_the_noise_is_warned():
    """sdpa runs what the exact reference runs: 2x 'faster' than itself with a tight spread means the load changed
    mid-run (as a busy machine did to a one-round run: 2.37x attention, no warning then)."""
    steady = speedups([1.0, 1.0, 1.0], [0.99, 1.0, 1.01])
    assert timing_warnings(64, {"sdpa": (steady, steady), "todo": (steady, steady)}) == []
    off = speedups([1.0, 1.0, 1.0], [0.42, 0.43, 0.41])
    warnings = timing_warnings(64, {"sdpa": (off, steady), "todo": (steady, steady)})
    assert len(warnings) == 1 and warnings[0].startswith("warning: 64 px: sdpa") and "attention" in warnings[0]
    wide = speedups([1.0, 1.0, 1.0], [0.9, 1.0, 1.2])  # median 1, +-15%: off 1 by less than the noise
    assert timing_warnings(64, {"sdpa": (wide, wide), "todo": (wide, wide)}) == []
    noisy = speedups([1.0, 1.0, 1.0], [0.3, 1.0, 3.0])  # a busy machine: the columns say little, and it says so
    warnings = timing_warnings(32, {"sdpa": (noisy, steady), "todo": (noisy, steady)})
    assert len(warnings) == 1 and "spread by" in warnings[0] and "attention" in warnings[0]
    single = speedups([1.0], [0.5])
    assert "one timing round" in timing_warnings(32, {"sdpa": (single, single)})[0]
