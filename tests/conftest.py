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


def collects_the_kernel_tests(config) -> bool:
    """Whether this run collects tests/test_kernels.py (the whole tests/ folder, or that file)."""
    for arg in config.args or [HERE]:
        path = os.path.abspath(os.path.join(str(config.invocation_params.dir), arg.split("::")[0]))
        if os.path.isdir(path) and os.path.commonpath([path, HERE]) == path:
            return True
        if os.path.basename(path) == "test_kernels.py":
            return True
    return False


def decorate_kernels_for_the_interpreter():
    """On CPU, tests/test_kernels.py runs the Triton kernels through Triton's interpreter, which Triton fixes when
    ``triton`` is first imported and each kernel decorated. pytest imports the test modules in name order, and a
    ComfyUI imported by a test_comfy_* module imports triton (compiling for GPUs), which made test_kernels.py skip
    all its tests. So triton and the kernel modules are imported here first, with TRITON_INTERPRET=1, and the
    variable is put back as it was (the other test modules must not see it). With
    EFFICIENT_ATTENTION_POP_DEVICE=cuda the kernels compile for real, as test_kernels.py expects there."""
    if os.environ.get("EFFICIENT_ATTENTION_POP_DEVICE", "cpu").startswith("cuda") or "triton" in sys.modules:
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
        from efficient_attention_pop.kernels import linear_triton_kernels, masked_triton_kernels  # noqa: F401
    except ImportError:
        pass  # no triton: test_kernels.py says so and skips
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def pytest_configure(config):
    if collects_the_kernel_tests(config):
        decorate_kernels_for_the_interpreter()
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
