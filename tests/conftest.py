import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPOSITORY = os.path.dirname(HERE)
sys.path.insert(0, HERE)  # tests import helpers.py, comfy_env.py, ...


class RepositoryRootIsNotATestPackage:
    """The repository root has an ``__init__.py`` because ComfyUI loads the folder as a custom node. pytest
    (rootdir = the repository root, where pyproject.toml holds its settings) would collect that folder as a test
    *package* and import its ``__init__.py`` to look for ``setup_module``: under a folder name that is not a
    Python identifier (``ComfyUI-EfficientAttention-PoP``, the name ComfyUI-Manager and the README use) as a
    plain module, where the pack's relative imports fail and every test errors; under a name such as ``main``
    as a package of that name, a second copy of the pack beside ``efficient_attention_pop``. The root is
    collected as a plain directory instead, so pytest never imports it, whatever the folder is called; the
    tests import the installed package ``efficient_attention_pop`` or load the folder the way ComfyUI does."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if os.path.samefile(path, REPOSITORY):
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config):
    # Registered as a plugin of its own, not a hook of this conftest: pytest collects the root directory with
    # the hooks of the folder above it, where a conftest.py of tests/ (or of the root) does not apply.
    config.pluginmanager.register(RepositoryRootIsNotATestPackage(), "efficient-attention-pop-repository-root")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With COMFYUI_PATH set, the ComfyUI tests (test_comfy_*.py) must run: a skip there is a failure, so a
    ComfyUI that does not import, or a missing dependency, cannot pass unnoticed."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("COMFYUI_PATH") and item.module.__name__.startswith("test_comfy_"):
        report.outcome = "failed"
        report.longrepr = f"skipped with COMFYUI_PATH set (no ComfyUI test may be skipped there): {report.longrepr}"
