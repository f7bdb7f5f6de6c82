import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests import helpers.py, comfy_env.py, ...


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With COMFYUI_PATH set, the ComfyUI tests (test_comfy_*.py) must run: a skip there is a failure, so a
    ComfyUI that does not import, or a missing dependency, cannot pass unnoticed."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("COMFYUI_PATH") and item.module.__name__.startswith("test_comfy_"):
        report.outcome = "failed"
        report.longrepr = f"skipped with COMFYUI_PATH set (no ComfyUI test may be skipped there): {report.longrepr}"
